"""Tiny random replicas of the paper's five expert reward models and of its critique evaluator
(Llama-3.3-70B-Instruct), built offline in seconds.

Each replica keeps its real model's class, weight names and head shapes, its tokenizer's special
tokens and turn layout (Llama 3.1's header tokens, Gemma 2's turns with ``model`` for the assistant
and a BOS that plain tokenisation adds again), so loading and scoring go through the code paths the
real checkpoints take (`carevl.backends.reward_heads`). Head weights are scaled up so rewards spread
over both signs, where a sigmoid would show.

    python -m carevl.standins.experts --out runs/experts     # one folder per replica
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import processors
from transformers import (
    Gemma2Config,
    Gemma2ForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from carevl.backends.reward_heads import INFORMRewardModel, QRMRewardModel
from carevl.standins.tiny import CHATML_TOKENS, train_tokenizer

# The paper's experts (CAREVL 3.2) by replica name: the real checkpoint and its family.
EXPERTS = {
    "inf-orm-llama3.1-70b": ("infly/INF-ORM-Llama3.1-70B", "inf_orm"),
    "skywork-reward-gemma-2-27b-v0.2": ("Skywork/Skywork-Reward-Gemma-2-27B-v0.2", "sequence_classification"),
    "skywork-reward-gemma-2-27b": ("Skywork/Skywork-Reward-Gemma-2-27B", "sequence_classification"),
    "skywork-reward-llama-3.1-8b-v0.2": ("Skywork/Skywork-Reward-Llama-3.1-8B-v0.2", "sequence_classification"),
    "qrm-llama3.1-8b": ("nicolinho/QRM-Llama3.1-8B", "qrm"),
}

LLAMA3_TOKENS = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)
# vLLM's CPU attention kernels take head sizes of 32 and up: the replicas run on the real engine too.
HEAD_DIM = 32
GEMMA_TOKENS = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
GEMMA_TEMPLATE = (
    "{{ '<bos>' }}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


def _tokenizer(specials: list[str], bos: str, eos: str, template: str):
    """A locally trained byte-level tokenizer whose plain tokenisation adds `bos`, like the real ones."""
    tokenizer = train_tokenizer(CHATML_TOKENS + specials)
    bos_id = tokenizer.convert_tokens_to_ids(bos)
    tokenizer.backend_tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_id)]),
        ]
    )
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.chat_template = bos, eos, template
    return tokenizer


def _body(tokenizer, hidden: int, layers: int) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // HEAD_DIM,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        bos_token_id=ids(tokenizer.bos_token),
        eos_token_id=ids(tokenizer.eos_token),
        pad_token_id=ids("<|endoftext|>"),
        num_labels=1,
    )


def _scale_head(model: torch.nn.Module, prefixes: tuple[str, ...], factor: float) -> None:
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.startswith(prefixes) and tensor.dim() == 2:
                tensor.mul_(factor)


def build_expert(name: str, out_dir: str | Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Write the tiny replica of expert `name` (a key of EXPERTS) to `out_dir`."""
    if name not in EXPERTS:
        raise ValueError(f"expert must be one of {sorted(EXPERTS)}, got {name!r}")
    torch.manual_seed(seed)
    family = EXPERTS[name][1]
    if name.startswith("skywork-reward-gemma"):
        tokenizer = _tokenizer(GEMMA_TOKENS, "<bos>", "<end_of_turn>", GEMMA_TEMPLATE)
        config = Gemma2Config(
            **_body(tokenizer, hidden, layers),
            head_dim=HEAD_DIM,
            query_pre_attn_scalar=HEAD_DIM,
            sliding_window=64,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        )
        model = Gemma2ForSequenceClassification(config)
    else:
        tokenizer = _tokenizer(LLAMA3_TOKENS, "<|begin_of_text|>", "<|eot_id|>", LLAMA3_TEMPLATE)
        config = LlamaConfig(**_body(tokenizer, hidden, layers))
        if family == "qrm":
            config.update(
                dict(num_objectives=5, num_quantiles=4, gating_temperature=10, gating_hidden_dim=16, gating_n_hidden=3)
            )
            model = QRMRewardModel(config)
            with torch.no_grad():  # trained BatchNorm statistics, so eval mode reads them
                for layer in model.gating.layers:
                    if isinstance(layer, torch.nn.BatchNorm1d):
                        layer.running_mean.uniform_(-0.1, 0.1)
                        layer.running_var.uniform_(0.5, 2.0)
                        layer.num_batches_tracked.fill_(1000)
                model.gating.logit_scale.fill_(20.0)  # a learnt scale; 1 leaves rewards near 0
        elif family == "inf_orm":
            model = INFORMRewardModel(config)
        else:
            model = LlamaForSequenceClassification(config)
    _scale_head(model, ("score", "regression_layer", "gating"), 50.0)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


EVALUATOR = "meta-llama/Llama-3.3-70B-Instruct"


def build_evaluator(out_dir: str | Path, hidden: int = 128, layers: int = 2, seed: int = 0) -> Path:
    """Write the tiny replica of the critique evaluator: a LlamaForCausalLM with Llama 3's chat
    template, whose generation stops at <|eot_id|> (the end of a turn), as the real one does."""
    torch.manual_seed(seed)
    tokenizer = _tokenizer(LLAMA3_TOKENS, "<|begin_of_text|>", "<|eot_id|>", LLAMA3_TEMPLATE)
    body = {k: v for k, v in _body(tokenizer, hidden, layers).items() if k != "num_labels"}
    model = LlamaForCausalLM(LlamaConfig(**body))
    model.generation_config.eos_token_id = body["eos_token_id"]
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write one replica folder per expert into")
    parser.add_argument("--only", nargs="*", choices=sorted(EXPERTS), help="replicas to build (default: all five)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in args.only or EXPERTS:
        path = build_expert(name, Path(args.out) / name, seed=args.seed)
        print(f"{name}: {EXPERTS[name][0]} ({EXPERTS[name][1]}) -> {path}")


if __name__ == "__main__":
    main()
