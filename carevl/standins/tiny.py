"""Tiny random-weight vision-language checkpoints, built offline in seconds.

Each builder writes a real Hugging Face checkpoint (config, safetensors weights, processor,
tokenizer, chat template) of one model family with a few layers and a byte-level BPE tokenizer
trained locally on the shapes world's text. `AutoModelForImageTextToText.from_pretrained` and
`AutoProcessor.from_pretrained` load it like any hub checkpoint, so the code paths under test are
the ones real models take.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from carevl.prompts import judge_prompt
from carevl.standins import shapes

log = logging.getLogger(__name__)

CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Chat template shared by the tiny families: ChatML turns, the family's image string for image parts.
_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '@IMAGE@' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def chat_template(image_string: str, prefix: str = "") -> str:
    template = _CHAT_TEMPLATE.replace("@IMAGE@", image_string)
    return "{{ '" + prefix + "' }}" + template if prefix else template


def world_corpus(n_items: int = 400) -> list[str]:
    """Text the tiny tokenizer is trained on: prompts, critiques and captions of the shapes world."""
    lines = [shapes.CAPTION_PROMPT]
    for item in shapes.judge_items(n_items, seed=12345):
        lines += [judge_prompt(item.question, item.responses), item.critique(), shapes.caption_target(item.scene)]
    lines.append("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()[]{}-+*/=<>_#%&@")
    return lines


def train_tokenizer(special_tokens: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE: any text encodes (byte fallback), and the world's words become single tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(world_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        additional_special_tokens=special_tokens[3:],
        padding_side="right",
    )


# A shapes-world image (56 px) is a 4 x 4 grid of 14 px patches, merged 2 x 2 into 4 image tokens.
MERGE = 2


def _qwen2_vl(tokenizer, hidden: int, layers: int):
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    ids = tokenizer.convert_tokens_to_ids
    heads = 4
    head_dim = hidden // heads
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads // 2,
            max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(head_dim)},
            bos_token_id=None,
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=2, embed_dim=64, hidden_size=hidden, num_heads=4, mlp_ratio=2, patch_size=14, spatial_merge_size=MERGE
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    pixels = shapes.IMAGE_SIZE * shapes.IMAGE_SIZE
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": pixels, "longest_edge": pixels}, merge_size=MERGE, patch_size=14, temporal_patch_size=2
    )
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        video_processor=Qwen2VLVideoProcessor(),
        tokenizer=tokenizer,
        chat_template=chat_template("<|vision_start|><|image_pad|><|vision_end|>"),
    )
    return Qwen2VLForConditionalGeneration(config), processor


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2
    first = half // 4
    return [first, (half - first) // 2, half - first - (half - first) // 2]


def _qwen2_text(tokenizer, hidden: int, layers: int) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        model_type="qwen2",
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
        bos_token_id=None,
    )


def _llava_onevision(tokenizer, hidden: int, layers: int):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tile = shapes.IMAGE_SIZE // 2  # SigLIP tiles of 28 px: 2 x 2 patches of 14 px each
    config = LlavaOnevisionConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=tile,
            patch_size=14,
        ),
        text_config=_qwen2_text(tokenizer, hidden, layers),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=[[tile, tile], [tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]],
        vision_feature_select_strategy="full",
    )
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": tile, "width": tile}, image_grid_pinpoints=config.image_grid_pinpoints
    )
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size={"height": tile, "width": tile}),
        num_image_tokens=(tile // 14) ** 2,
        vision_feature_select_strategy="full",
        chat_template=chat_template("<image>"),
    )
    return LlavaOnevisionForConditionalGeneration(config), processor


def _mllama(tokenizer, hidden: int, layers: int):
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor

    tile = shapes.IMAGE_SIZE  # one tile of 4 x 4 patches
    config = MllamaConfig(
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_global_layers=1,
            attention_heads=4,
            image_size=tile,
            patch_size=14,
            max_num_tiles=1,
            intermediate_layers_indices=[0],
            vision_output_dim=128,
            supported_aspect_ratios=[[1, 1]],
        ),
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            cross_attention_layers=[layers - 1],
            max_position_embeddings=2048,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            bos_token_id=tokenizer.convert_tokens_to_ids("<|begin_of_text|>"),
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"),
    )
    image_processor = MllamaImageProcessor(size={"height": tile, "width": tile}, max_image_tiles=1)
    # Mllama's processor wants the prompt to open with the BOS text, as Llama 3's template does.
    tokenizer.bos_token = "<|begin_of_text|>"
    template = chat_template("<|image|>", prefix="<|begin_of_text|>")
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)
    return MllamaForConditionalGeneration(config), processor


FAMILIES = {
    "qwen2_vl": (_qwen2_vl, ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]),
    "llava_onevision": (_llava_onevision, ["<image>", "<video>"]),
    "mllama": (_mllama, ["<|image|>", "<|begin_of_text|>"]),
}


def _hub_layout_siglip(folder: Path) -> None:
    """Store the SigLIP tower's weights under ``vision_tower.vision_model.``, as the hub's LLaVA-
    OneVision checkpoints do. transformers 5 saves them one level flatter and reads both; vLLM
    (0.32) reads only the hub's layout."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    prefix = "vision_tower."
    weights = load_file(path)
    renamed = {
        (prefix + "vision_model." + key[len(prefix) :]) if key.startswith(prefix) else key: value
        for key, value in weights.items()
    }
    save_file(renamed, path, metadata={"format": "pt"})


def build_tiny_model(
    out_dir: str | Path, family: str = "qwen2_vl", hidden: int = 128, layers: int = 4, seed: int = 0
) -> Path:
    """Write a tiny random-weight checkpoint of `family` with its processor to `out_dir`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(FAMILIES)}")
    build, extra_tokens = FAMILIES[family]
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(CHATML_TOKENS + extra_tokens)
    model, processor = build(tokenizer, hidden, layers)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if family == "llava_onevision":
        _hub_layout_siglip(out)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("wrote tiny %s (%.2fM parameters, vocab %d) to %s", family, n_params / 1e6, len(tokenizer), out)
    return out


BOS = "<|begin_of_text|>"


def build_tiny_reward_model(out_dir: str | Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A tiny sequence-classification reward model (one raw logit, Skywork-Reward's layout) with a
    Llama-style tokenizer: its chat template starts with the BOS token and plain tokenisation adds
    BOS too, the trap that gives a reward model a second BOS when a rendered template is re-tokenised."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = train_tokenizer(CHATML_TOKENS + [BOS])
    bos = tokenizer.convert_tokens_to_ids(BOS)
    tokenizer.backend_tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos)]),
        ]
    )
    tokenizer.bos_token = BOS
    tokenizer.chat_template = chat_template("", prefix=BOS)
    config = Qwen2Config(**{**_qwen2_text(tokenizer, hidden, layers), "bos_token_id": bos}, num_labels=1)
    model = Qwen2ForSequenceClassification(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_text_model(out_dir: str | Path, hidden: int = 128, layers: int = 2, seed: int = 0) -> Path:
    """A tiny text-only chat model (Qwen2ForCausalLM, ChatML template): the language-model role of
    curation (the critique evaluator, a text candidate). The default width gives 32-wide attention
    heads, the smallest vLLM's CPU kernels take."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tokenizer = train_tokenizer(CHATML_TOKENS)
    tokenizer.chat_template = chat_template("")
    model = Qwen2ForCausalLM(Qwen2Config(**_qwen2_text(tokenizer, hidden, layers)))
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write the checkpoint to")
    parser.add_argument("--family", default="qwen2_vl", choices=sorted(FAMILIES))
    parser.add_argument("--hidden", type=int, default=128, help="language model width")
    parser.add_argument("--layers", type=int, default=4, help="language model depth")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_tiny_model(args.out, args.family, args.hidden, args.layers, args.seed)


if __name__ == "__main__":
    main()
