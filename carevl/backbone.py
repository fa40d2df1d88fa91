"""The backbone shared by SFT and DPO: any Hugging Face image-text-to-text model and its processor.

It freezes the vision encoder (and optionally the projector) through one small per-family table,
adds optional LoRA adapters on the language model, and computes summed response log-probs without
full-vocabulary logits at image and prompt positions (preference groups through
`carevl.group_logprobs`). `export` writes a Hugging Face checkpoint (model + processor, LoRA merged
on request) that transformers loads back.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from carevl import group_logprobs, packing
from carevl.flops import ModelFlops
from carevl.losses import response_token_logprobs, sequence_logprobs
from carevl.prompts import write_trained_prompt
from carevl.strategies import zero_stage
from carevl.vision_attention import batch_vision_attention

log = logging.getLogger(__name__)


def check_checkpoint(name: str) -> None:
    """Fail at once, naming the problem, for a checkpoint that cannot load: a local folder that is
    not there (transformers would take its name for a hub id and try the hub), or, on a machine
    whose hub is offline (HF_HUB_OFFLINE), a hub id its cache does not hold."""
    path = Path(name).expanduser()
    if path.is_dir():
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or path.exists():
        raise FileNotFoundError(f"no checkpoint folder at {name}")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise FileNotFoundError(
                f"{name} is not a local folder, and the hub cache does not hold it (HF_HUB_OFFLINE is set)"
            )


@dataclass(frozen=True)
class Family:
    """Parameter-name prefixes of one model family (transformers >= 5 module layout)."""

    vision: tuple[str, ...]
    projector: tuple[str, ...]
    language: str


FAMILIES = {
    "qwen2_vl": Family(
        vision=("model.visual.",), projector=("model.visual.merger.",), language="model.language_model."
    ),
    "qwen2_5_vl": Family(
        vision=("model.visual.",), projector=("model.visual.merger.",), language="model.language_model."
    ),
    "llava_onevision": Family(
        vision=("model.vision_tower.",),
        projector=("model.multi_modal_projector.", "model.image_newline"),
        language="model.language_model.",
    ),
    "mllama": Family(
        vision=("model.vision_model.",), projector=("model.multi_modal_projector.",), language="model.language_model."
    ),
}
LORA_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FLOAT32_WEIGHTS = ("none", "trainable", "all")


@dataclass
class LoraSettings:
    """LoRA adapters on the language model's attention and MLP projections.

    Args:
        r: adapter rank.
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapter input.
        layers: names of the projection layers that get adapters.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    layers: tuple[str, ...] = LORA_LAYERS


class Backbone(nn.Module):
    """A vision-language model ready for judge training.

    Args:
        model: Hugging Face name or local path of an image-text-to-text checkpoint.
        freeze_vision: keep the vision encoder frozen (the paper's setting).
        freeze_projector: also freeze the vision-to-language projector.
        lora: train LoRA adapters on the language model instead of all of its weights.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        dtype: weight dtype at load time: float32, bfloat16 or float16. Under bf16-mixed training
            without DeepSpeed (which keeps float32 master weights itself) the weights the optimizer
            steps are held in float32 (`build`'s `float32_weights`): an AdamW update of 1e-5 is
            below bfloat16's resolution at a weight's scale and would be rounded away.
        attn_implementation: "sdpa", "eager" or "flash_attention_2".
        trust_remote_code: run code shipped with the checkpoint (off unless a config says so).
        compile_layers: compile each decoder layer of the language model with torch.compile (regional
            compilation): the norms, rotary embeddings, activations and residual adds around each
            layer's matrix products fuse into a few kernels, so a step launches far fewer of them
            (a 2B step at batch 4 was bound by its launches; the GPU speed-up is not yet measured).
            The first steps compile, and compile once more when sequence lengths first change. Not
            under sharded strategies (ZeRO-3, FSDP), whose parameter gathering runs around every
            submodule.
        random_init: build the checkpoint's architecture from its config with random weights (for
            throughput checks at a real size without downloading weights).
        batch_vision_attention: Qwen2-VL with SDPA: attend over all images of one size in one call
            per vision layer, reading the sizes from the GPU once per forward, instead of one call and
            one read per image and layer (`carevl.vision_attention`). The outputs are the same.
        logit_chunk: response tokens through the language-model head at a time; each chunk is
            recomputed in the backward pass, so the float32 log-softmax over the vocabulary is held
            for one chunk instead of for every response token of the batch (`carevl.losses.token_logprobs`).
            None: all at once. Not under ZeRO-3 (see `head_chunk`).
    """

    def __init__(
        self,
        model: str,
        freeze_vision: bool = True,
        freeze_projector: bool = False,
        lora: LoraSettings | None = None,
        gradient_checkpointing: bool = False,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        trust_remote_code: bool = False,
        compile_layers: bool = False,
        random_init: bool = False,
        batch_vision_attention: bool = True,
        logit_chunk: int | None = 2048,
    ):
        self.settings = {k: v for k, v in locals().items() if k not in ("self", "__class__")}  # for `unsharded`
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        check_checkpoint(model)
        self.name = model
        self.freeze_vision = freeze_vision
        self.freeze_projector = freeze_projector
        self.lora = lora
        self.gradient_checkpointing = gradient_checkpointing
        self.dtype = dtype
        self.attn_implementation = attn_implementation
        self.trust_remote_code = trust_remote_code
        self.compile_layers = compile_layers
        self.random_init = random_init
        self.batch_vision_attention = batch_vision_attention
        if logit_chunk is not None and logit_chunk < 1:
            raise ValueError(f"logit_chunk counts response tokens (None: no chunks), got {logit_chunk}")
        self.logit_chunk = logit_chunk
        self.model: nn.Module | None = None
        self.model_flops: ModelFlops | None = None  # the model's FLOPs per unit of work (`build`)
        self.processor = None

    # -- building -------------------------------------------------------------------------------

    def build(self, deepspeed_config: dict | None = None, float32_weights: str = "none") -> None:
        """Load the model and processor, freeze, add adapters. Idempotent.

        `float32_weights` says which weights to hold in float32 when `dtype` is a half type
        (`carevl.strategies.float32_weights` picks it for a training run's strategy): "none",
        "trainable" (the optimizer steps them; autocast computes in half precision) or "all" (FSDP:
        a shard unit flattens its weights into one dtype, and its mixed precision computes in half).

        Under DeepSpeed, pass the strategy's config. DeepSpeed's optimizers flatten the trainable
        weights into one buffer, so LoRA adapters keep the model's dtype (peft would otherwise
        upcast them to float32; DeepSpeed keeps float32 master weights itself). Under ZeRO-3 modules
        are built inside its `zero.Init`, each parameter partitioned as it is created, and
        transformers can only load checkpoint weights into partitioned parameters when it knows the
        config (it gathers each module's parameters, copies, and re-partitions; without it loading
        fails).
        """
        if self.model is not None:
            return
        from transformers import AutoModelForImageTextToText, AutoProcessor

        zero3 = zero_stage(deepspeed_config) == 3
        if zero3:
            from transformers.integrations import HfDeepSpeedConfig

            # transformers keeps only a weak reference: hold it while the model lives (generate
            # also reads it, to keep ranks in step under ZeRO-3).
            self._zero3 = HfDeepSpeedConfig(deepspeed_config)

        options = self._load_options()
        if self.random_init:  # a model of the checkpoint's shape with fresh random weights (throughput checks)
            from transformers import AutoConfig

            hf = AutoModelForImageTextToText.from_config(
                AutoConfig.from_pretrained(self.name, trust_remote_code=self.trust_remote_code), **options
            )
        else:
            hf = AutoModelForImageTextToText.from_pretrained(self.name, **options)
        self.processor = AutoProcessor.from_pretrained(self.name, trust_remote_code=self.trust_remote_code)
        hf.train()  # from_pretrained returns eval mode; Lightning keeps whatever mode modules are in
        family = self.family_of(hf)
        self._freeze(hf, family)
        if self.batch_vision_attention:
            batch_vision_attention(hf)
        if self.gradient_checkpointing:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            hf.config.use_cache = False
        if self.lora is not None:
            hf = self._add_lora(hf, family, zero3=zero3, adapter_float32=deepspeed_config is None)
        self._hold_in_float32(hf, float32_weights)
        base = hf.get_base_model() if self.lora is not None else hf
        if self.gradient_checkpointing and self.freeze_vision:
            self._keep_vision_out_of_the_graph(base, family)
        if self.compile_layers:
            self.compile_decoder_layers(base)
        self.model = hf
        # Counted now, while every weight is whole: FSDP wraps the model later and then leaves each
        # rank only its shard (ZeRO-3, which partitions while loading, reports whole sizes).
        self.model_flops = ModelFlops.of(self.hf, family.vision, family.projector)
        trainable = sum(p.numel() for p in hf.parameters() if p.requires_grad)
        total = sum(p.numel() for p in hf.parameters())
        log.info(
            "loaded %s (%s): %.1fM of %.1fM parameters trainable",
            self.name,
            hf.config.model_type,
            trainable / 1e6,
            total / 1e6,
        )

    @staticmethod
    def _hold_in_float32(hf: nn.Module, which: str) -> None:
        """Upcast the trainable weights ("trainable") or all of them ("all") in place (the values
        are unchanged: bf16 and fp16 are exact in float32; tied weights stay one parameter)."""
        if which not in FLOAT32_WEIGHTS:
            raise ValueError(f"float32_weights must be one of {FLOAT32_WEIGHTS}, got {which!r}")
        for param in hf.parameters():
            if (
                param.is_floating_point()
                and param.dtype != torch.float32
                and (which == "all" or (which == "trainable" and param.requires_grad))
            ):
                param.data = param.data.float()

    def _load_options(self) -> dict:
        return dict(
            dtype=DTYPES[self.dtype],
            attn_implementation=self.attn_implementation,
            trust_remote_code=self.trust_remote_code,
        )

    def load_frozen(self) -> nn.Module:
        """The checkpoint loaded again, frozen and in eval mode: the DPO reference where the policy's
        weights cannot be copied (ZeRO-3 has partitioned them). Inside ZeRO-3's `zero.Init` (where
        Lightning runs `configure_model`) it is partitioned as it loads."""
        if self.random_init:
            raise ValueError(
                "a reference loaded from the checkpoint would not equal a random_init policy: use random_init: false"
            )
        from transformers import AutoModelForImageTextToText

        hf = AutoModelForImageTextToText.from_pretrained(self.name, **self._load_options()).eval()
        hf.requires_grad_(False)
        if self.batch_vision_attention:
            batch_vision_attention(hf)
        return hf

    @staticmethod
    def compile_decoder_layers(hf: nn.Module) -> None:
        """Compile the language model's decoder layers in place (parameter names are unchanged, so
        checkpoints and exports are too). Layers share one compiled graph: their code is the same
        and their weights are graph inputs."""
        for layer in hf.model.language_model.layers:
            layer.compile()

    @staticmethod
    def family_of(hf: nn.Module) -> Family:
        model_type = hf.config.model_type
        if model_type not in FAMILIES:
            raise ValueError(f"model type {model_type!r} has no entry in the family table; known: {sorted(FAMILIES)}")
        return FAMILIES[model_type]

    def _freeze(self, hf: nn.Module, family: Family) -> None:
        # Qwen2-VL's projector (the merger) lives inside its vision tower: it follows freeze_projector.
        for name, param in hf.named_parameters():
            is_projector = name.startswith(family.projector)
            is_vision = name.startswith(family.vision) and not is_projector
            if (is_vision and self.freeze_vision) or (is_projector and self.freeze_projector):
                param.requires_grad_(False)

    @staticmethod
    def _keep_vision_out_of_the_graph(hf: nn.Module, family: Family) -> None:
        """Gradient checkpointing in transformers (and peft after it) hooks the input embeddings of
        every sub-model to make their outputs require grad, the vision tower's patch embedding
        included. The frozen tower would then record a graph, and be recomputed and backpropagated
        through in every step (three times its forward). carevl checkpoints non-reentrantly, which
        needs no grad on inputs: the vision side's hooks go."""
        for name, module in hf.named_modules():
            if (name + ".").startswith(family.vision) and not (name + ".").startswith(family.projector):
                for key, hook in list(module._forward_hooks.items()):
                    if getattr(hook, "__name__", "") == "make_inputs_require_grads":
                        del module._forward_hooks[key]

    def _add_lora(self, hf: nn.Module, family: Family, zero3: bool = False, adapter_float32: bool = True) -> nn.Module:
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer

        targets = [
            name
            for name, module in hf.named_modules()
            if isinstance(module, nn.Linear)
            and name.startswith(family.language)
            and name.rsplit(".", 1)[-1] in self.lora.layers
        ]
        if not targets:
            raise ValueError(f"no LoRA target layers {self.lora.layers} under {family.language}")
        config = LoraConfig(
            r=self.lora.r, lora_alpha=self.lora.alpha, lora_dropout=self.lora.dropout, target_modules=targets
        )
        peft_model = get_peft_model(hf, config, autocast_adapter_dtype=adapter_float32)
        if zero3:
            # peft initialises the adapters after zero.Init has partitioned them, which writes into
            # empty tensors: B keeps nn.Linear's random init and the model no longer starts at its
            # checkpoint. Initialise again on the gathered weights.
            import deepspeed

            layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
            params = [p for layer in layers for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters()]]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                for layer in layers:
                    layer.reset_lora_parameters("default", init_lora_weights=True)
        return peft_model

    @property
    def head_chunk(self) -> int | None:
        """`logit_chunk`, or None under ZeRO-3. ZeRO-3 releases the head's weight when the head's
        forward returns and gathers it again only when the backward pass reaches the head's output;
        a chunk recomputed inside its cross-entropy's backward would run before that, on the
        released (empty) weight. Seen on CPU through DeepSpeed's engine (tests/test_deepspeed.py)."""
        return None if getattr(self, "_zero3", None) is not None else self.logit_chunk

    @property
    def hf(self) -> nn.Module:
        """The Hugging Face model (under the PEFT wrapper when LoRA is on; adapters are injected in it)."""
        if self.model is None:
            raise RuntimeError("call build() first")
        return self.model.get_base_model() if self.lora is not None else self.model

    def vision_parameters(self) -> dict[str, torch.Tensor]:
        family = self.family_of(self.hf)
        return {
            n: p
            for n, p in self.hf.named_parameters()
            if n.startswith(family.vision) and not n.startswith(family.projector)
        }

    # -- computing ------------------------------------------------------------------------------

    def hidden_states(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, H) last hidden states of the language model; no vocabulary projection."""
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "prompt_length")}
        return self.hf.model(**model_inputs, use_cache=False).last_hidden_state

    def response_logprobs(
        self, inputs: dict[str, torch.Tensor], packed: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs of response tokens (labels != -100) and the batch row of each.

        With `packed`, the batch's samples run end to end in one row without padding
        (`carevl.packing`); the values are the same."""
        if not packed:
            hidden = self.hidden_states(inputs)
            return response_token_logprobs(hidden, inputs["labels"], self.hf.lm_head, self.head_chunk)
        row, owner = packing.pack_batch(self.hf, inputs)
        logps, _ = response_token_logprobs(self.hidden_states(row), row["labels"], self.hf.lm_head, self.head_chunk)
        return logps, packing.packed_response_rows(row["labels"], owner)

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's padding id (0 when it has none)."""
        return self.processor.tokenizer.pad_token_id or 0

    def image_features(
        self, inputs: dict[str, torch.Tensor], model: nn.Module | None = None
    ) -> list[torch.Tensor] | None:
        """Per-image features of a group batch's unique images (`carevl.group_logprobs.image_features`),
        with this model or `model` (the reference, of the same architecture)."""
        return group_logprobs.image_features(self.hf if model is None else model, inputs)

    def packs_group(self, batch: dict) -> bool:
        """Whether scoring `batch` with shared image features computes each group's prompt once."""
        return group_logprobs.packs_group(self.hf, batch)

    def group_logprobs(
        self, batch: dict, features: list[torch.Tensor] | None = None, model: nn.Module | None = None, pack: bool = True
    ) -> torch.Tensor:
        """(S,) summed response log-probs of every sequence of a preference-group batch, by this model
        or by `model` (the frozen reference); see `carevl.group_logprobs.group_logprobs`."""
        hf = self.hf if model is None else model
        return group_logprobs.group_logprobs(
            hf, batch, features, chunk=self.head_chunk, pad_token_id=self.pad_token_id, pack=pack
        )

    def sequence_logprobs(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) log pi(response | image, prompt), summed over response tokens."""
        logps, rows = self.response_logprobs(inputs)
        return sequence_logprobs(logps, rows, inputs["labels"].shape[0])

    @torch.no_grad()
    def generate(
        self,
        inputs: dict[str, torch.Tensor],
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> list[str]:
        """Decoded continuations of left-padded prompt inputs: greedy, or sampled at `temperature`
        with nucleus `top_p`, and nothing else. transformers fills every setting not passed from the
        checkpoint's generation_config.json; Qwen2-VL's holds top_k 1 (which makes sampling greedy)
        and repetition_penalty 1.05, so both are set here."""
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "prompt_length")}
        tokenizer = self.processor.tokenizer
        sampling = {"temperature": temperature, "top_p": top_p, "top_k": 0} if do_sample else {}
        out = self.hf.generate(
            **model_inputs,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            use_cache=True,
            do_sample=do_sample,
            repetition_penalty=1.0,
            **sampling,
        )
        new_tokens = out[:, model_inputs["input_ids"].shape[1] :]
        return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    # -- saving ---------------------------------------------------------------------------------

    def _in_configured_dtype(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`weights` in `dtype` (those held in float32 for training included); tied weights stay
        one tensor."""
        dtype, cast = DTYPES[self.dtype], {}
        for key, weight in weights.items():
            if weight.is_floating_point() and weight.dtype != dtype:
                same = (weight.untyped_storage().data_ptr(), weight.storage_offset(), weight.shape)
                if same not in cast:
                    cast[same] = weight.to(dtype)
                weights[key] = cast[same]
        return weights

    def unsharded(self, weights: dict[str, torch.Tensor]) -> Backbone:
        """A CPU copy of this backbone, built from the same settings, holding `weights`: this
        backbone's whole weights by their names in `self.model` (`carevl.strategies.whole_weights`
        gathers them under ZeRO-3 and FSDP, where this process holds only a shard)."""
        from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

        copy_ = Backbone(**self.settings)
        zero3 = getattr(self, "_zero3", None)
        if zero3 is not None:
            unset_hf_deepspeed_config()  # else transformers would partition the copy as it loads
        try:
            copy_.build()
        finally:
            if zero3 is not None:
                set_hf_deepspeed_config(zero3)
        missing = set(dict(copy_.model.named_parameters())) - set(weights)
        unexpected = set(weights) - set(copy_.model.state_dict())
        if missing or unexpected:
            raise RuntimeError(
                f"gathered weights do not match the model: missing {sorted(missing)[:5]}, unexpected "
                f"{sorted(unexpected)[:5]}"
            )
        copy_.model.load_state_dict(weights, strict=False)
        return copy_

    def export(
        self,
        out_dir: str | Path,
        merge_lora: bool = True,
        weights: dict[str, torch.Tensor] | None = None,
        judge: bool = False,
    ) -> Path:
        """Write model and processor as a Hugging Face checkpoint.

        With LoRA, `merge_lora` folds the adapters into a copy of the weights (the training model is
        left untouched); otherwise only the adapters are written, next to the processor. `weights`:
        the whole weights when this process holds shards of them (see `unsharded`). `judge`: the
        model was trained as a carevl judge; the checkpoint says so (`prompts.TRAINED_PROMPT_FILE`),
        and evaluation then asks it in the prompt it learned.
        """
        if weights is not None:
            return self.unsharded(weights).export(out_dir, merge_lora=merge_lora, judge=judge)
        out = Path(out_dir)
        model = self.model
        if self.lora is not None and merge_lora:
            model = copy.deepcopy(model).merge_and_unload()
        was_training = model.training
        if self.lora is not None and not merge_lora:
            model.save_pretrained(out)  # the adapters, in the dtype they trained in
        else:
            model.save_pretrained(out, state_dict=self._in_configured_dtype(model.state_dict()))
        self.processor.save_pretrained(out)
        if judge:
            write_trained_prompt(out)
        model.train(was_training)
        log.info("exported %s to %s", self.name, out)
        return out
