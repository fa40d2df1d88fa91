"""The heads of the paper's expert reward models (CAREVL 3.2: M = 5 text-only reward models), one
family per head layout, each faithful to how its real checkpoint is stored and read:

- ``sequence_classification``: Skywork-Reward-Llama-3.1-8B-v0.2, Skywork-Reward-Gemma-2-27B and
  Skywork-Reward-Gemma-2-27B-v0.2. ``LlamaForSequenceClassification`` /
  ``Gemma2ForSequenceClassification``: one linear ``score.weight`` (no bias) read at the last
  token; the reward is ``logits[:, 0]``, raw.
- ``inf_orm``: INF-ORM-Llama3.1-70B. A Llama body with a two-layer MLP head, ``score.0`` (hidden to
  hidden, with bias), ReLU, ``score.2`` (hidden to 1, with bias), read at the last token. Its
  config names ``LlamaForSequenceClassification``, so ``AutoModelForSequenceClassification``
  builds a one-layer ``score`` head, leaves it at random initialisation and drops ``score.0/2``.
- ``qrm``: QRM-Llama3.1-8B. A Llama body; ``regression_layer`` maps the last token to
  ``num_objectives x num_quantiles`` quantiles; a gating network (``gating.layers``: three
  Linear-ReLU-BatchNorm blocks and a Linear, softmax at ``gating_temperature``, times
  ``gating.logit_scale``) weighs the objectives from the hidden state at the start of the last
  ``<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n`` in the conversation; the reward
  is ``output.score`` = sum over objectives of gate x (mean quantile @ ``reward_transform_matrix``).
  Its remote code does not import under transformers 5; this class reads the same weights.

The custom heads run in float32 whatever the body's dtype, as the reference code does. Loading is
strict: any weight the checkpoint lacks, has extra or has in another shape is an error that names
it (`IncompleteCheckpoint`), never a randomly initialised head.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, LlamaModel, LlamaPreTrainedModel

FAMILIES = ("sequence_classification", "inf_orm", "qrm")

# Weight names that identify each head layout, for the hint in a failed load.
HEAD_WEIGHTS = {
    "sequence_classification": ("score.weight",),
    "inf_orm": ("score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias"),
    "qrm": ("regression_layer.weight", "reward_transform_matrix", "gating.logit_scale"),
}

QRM_GATING_TEXT = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


class IncompleteCheckpoint(ValueError):
    """A reward model checkpoint whose weights do not match the family's layout."""


def last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of each row's last real token (rows padded on the right)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, attention_mask.sum(-1).to(hidden.device) - 1]


class INFORMRewardModel(LlamaPreTrainedModel):
    """INF-ORM-Llama3.1-70B's layout: ``model`` (Llama) and ``score`` = Linear, ReLU, Linear."""

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        width = config.hidden_size
        self.score = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, config.num_labels))
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        head = self.score[0].weight
        return self.score(last_token(hidden, attention_mask).to(head.device, head.dtype))[:, 0].float()


class QRMGating(nn.Module):
    """QRM's gating network: ``n_hidden`` blocks of Linear (no bias), ReLU, BatchNorm1d, then a
    Linear to one weight per objective; softmax at `temperature`, scaled by ``logit_scale``."""

    def __init__(self, width: int, objectives: int, temperature: float, hidden: int, n_hidden: int):
        super().__init__()
        self.temperature = temperature
        self.logit_scale = nn.Parameter(torch.ones(1))
        layers: list[nn.Module] = []
        for _ in range(n_hidden):
            layers += [nn.Linear(width, hidden, bias=False), nn.ReLU(), nn.BatchNorm1d(hidden)]
            width = hidden
        layers.append(nn.Linear(width, objectives))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return torch.softmax(x / self.temperature, dim=-1) * self.logit_scale[0]


class QRMRewardModel(LlamaPreTrainedModel):
    """QRM-Llama3.1-8B's layout (see the module docstring). `forward` needs, per row, the position
    where the gating network reads the prompt (`gating_positions`, from `gating_position`)."""

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        objectives = getattr(config, "num_objectives", 19)
        self.num_objectives, self.num_quantiles = objectives, config.num_quantiles
        self.regression_layer = nn.Linear(config.hidden_size, objectives * config.num_quantiles, bias=False)
        self.reward_transform_matrix = nn.Parameter(torch.eye(objectives), requires_grad=False)
        self.gating = QRMGating(
            config.hidden_size,
            objectives,
            temperature=getattr(config, "gating_temperature", 10),
            hidden=getattr(config, "gating_hidden_dim", 1024),
            n_hidden=getattr(config, "gating_n_hidden", 3),
        )
        self.post_init()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, gating_positions: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        head = self.regression_layer.weight
        quantiles = self.regression_layer(last_token(hidden, attention_mask).to(head.device, head.dtype).float())
        expectation = quantiles.view(-1, self.num_objectives, self.num_quantiles).mean(-1)
        rewards = expectation @ self.reward_transform_matrix.float()
        gate = self.gating(hidden[rows, gating_positions.to(hidden.device)].to(head.device).float())
        return (gate * rewards).sum(-1)


def gating_position(ids: list[int], pattern: list[int]) -> int | None:
    """Index of the first token of the last occurrence of `pattern` in `ids`, None if absent."""
    for start in range(len(ids) - len(pattern), -1, -1):
        if ids[start : start + len(pattern)] == pattern:
            return start
    return None


def model_class(family: str):
    if family not in FAMILIES:
        raise ValueError(f"reward model family must be one of {FAMILIES}, got {family!r}")
    return {
        "sequence_classification": AutoModelForSequenceClassification,
        "inf_orm": INFORMRewardModel,
        "qrm": QRMRewardModel,
    }[family]


def load_reward_model(path: str, family: str, **kwargs) -> nn.Module:
    """The family's model with every weight read from `path`, in eval mode; custom heads in float32.

    Raises IncompleteCheckpoint when a weight is missing, unexpected or of another shape, naming
    the family whose head the checkpoint's extra weights belong to where one does.
    """
    model, info = model_class(family).from_pretrained(path, output_loading_info=True, **kwargs)
    problems = {
        name: sorted(str(k) for k in info.get(name) or [])
        for name in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    if any(problems.values()):
        listed = "; ".join(f"{name.replace('_', ' ')}: {keys[:6]}" for name, keys in problems.items() if keys)
        extra = set(problems["unexpected_keys"])
        hint = next((f"; its head is {other}'s" for other, names in HEAD_WEIGHTS.items() if extra & set(names)), "")
        raise IncompleteCheckpoint(f"{path} does not match the {family} layout ({listed}){hint}")
    if family == "qrm":
        model.regression_layer.float()
        model.gating.float()
    if family == "inf_orm":
        model.score.float()
    return model.eval()


def checkpoint_weight_names(path: str) -> set[str]:
    """The weight names a checkpoint stores, read from its safetensors headers only (a local folder,
    or a hub id through `huggingface_hub.get_safetensors_metadata`)."""
    import json
    from pathlib import Path

    folder = Path(path)
    if folder.is_dir():
        index = folder / "model.safetensors.index.json"
        if index.exists():
            return set(json.loads(index.read_text())["weight_map"])
        from safetensors import safe_open

        names: set[str] = set()
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                names.update(handle.keys())
        return names
    from huggingface_hub import get_safetensors_metadata

    return set(get_safetensors_metadata(path).weight_map)


def check_head(path: str, family: str) -> None:
    """Raise IncompleteCheckpoint unless `path` stores exactly the `family` head's weights (for
    engines that would otherwise fill a head they do not find, or drop one they do not know)."""
    names = checkpoint_weight_names(path)
    if not names:
        raise IncompleteCheckpoint(f"{path} holds no safetensors weights")
    missing = [n for n in HEAD_WEIGHTS[family] if n not in names]
    foreign = next((other for other, heads in HEAD_WEIGHTS.items() if other != family and set(heads) & names), None)
    if missing or foreign:
        found = f"; its head is {foreign}'s" if foreign else ""
        raise IncompleteCheckpoint(f"{path} does not match the {family} layout (missing: {missing}){found}")
