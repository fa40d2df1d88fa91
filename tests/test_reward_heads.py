"""The paper's five expert reward models, as tiny replicas of their real layouts: every weight read,
a missing or foreign head an error, and rewards equal to the head's arithmetic done by hand."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from carevl.backends.reward_heads import QRM_GATING_TEXT, IncompleteCheckpoint, load_reward_model
from carevl.standins.experts import EXPERTS, build_expert


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    return {name: build_expert(name, root / name) for name in EXPERTS}


@pytest.fixture(scope="module")
def scorers(replicas):
    from carevl.backends.hf import HFReward

    return {name: HFReward(str(path), family=EXPERTS[name][1], batch_size=3) for name, path in replicas.items()}


def conversation(question, answer):
    return [
        {"role": "user", "content": f"{question}\n\nImage description: two red circles at the left"},
        {"role": "assistant", "content": answer},
    ]


CONVERSATIONS = [
    conversation("What colour are the shapes?", "The shapes are red."),
    conversation("What colour are the shapes?", "Blue."),
    conversation("How many shapes are there?", "Looking at the image carefully, there are three of them, I think."),
    conversation("What kind of shape is shown?", "It is a circle."),
]


@pytest.mark.parametrize("name", sorted(EXPERTS))
def test_replica_loads_with_every_weight_read(replicas, scorers, name):
    stored = load_file(replicas[name] / "model.safetensors")
    loaded = scorers[name].model.state_dict()
    assert set(stored) == set(loaded)
    for key, tensor in stored.items():
        assert torch.equal(loaded[key].to(tensor.dtype), tensor), key


@pytest.mark.parametrize("name", sorted(EXPERTS))
def test_a_removed_head_weight_is_an_error_naming_it(replicas, tmp_path, name):
    source = replicas[name]
    for file in source.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    weights = load_file(source / "model.safetensors")
    head = {"inf_orm": "score.2.weight", "qrm": "gating.layers.9.bias"}.get(EXPERTS[name][1], "score.weight")
    del weights[head]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(IncompleteCheckpoint, match=head.replace(".", r"\.")):
        load_reward_model(str(tmp_path), EXPERTS[name][1])


def test_inf_orm_read_as_plain_sequence_classification_is_refused(replicas):
    """The trap the issue found: AutoModelForSequenceClassification builds a one-layer head at random."""
    with pytest.raises(IncompleteCheckpoint, match="its head is inf_orm's"):
        load_reward_model(str(replicas["inf-orm-llama3.1-70b"]), "sequence_classification")


def body_states(path, ids):
    from transformers import AutoModel

    body = AutoModel.from_pretrained(str(path)).eval()
    with torch.no_grad():
        return body(input_ids=torch.tensor([ids])).last_hidden_state[0]


@pytest.mark.parametrize("name", sorted(EXPERTS))
def test_rewards_are_the_heads_arithmetic_by_hand(replicas, scorers, name):
    """Each conversation alone through the body, then the head's formula from the stored weights;
    the scorer batches with padding and must agree. No activation anywhere: rewards leave (0, 1)."""
    scorer, weights, family = scorers[name], load_file(replicas[name] / "model.safetensors"), EXPERTS[name][1]
    config = json.loads((replicas[name] / "config.json").read_text())
    expected = []
    for conv in CONVERSATIONS:
        ids = scorer.token_ids(conv)
        hidden = body_states(replicas[name], ids)
        last = hidden[-1]
        if family == "sequence_classification":
            expected.append(float(last @ weights["score.weight"][0]))
        elif family == "inf_orm":
            inner = F.relu(F.linear(last, weights["score.0.weight"], weights["score.0.bias"]))
            expected.append(float(F.linear(inner, weights["score.2.weight"], weights["score.2.bias"])[0]))
        else:
            objectives, quantiles = config["num_objectives"], config["num_quantiles"]
            mean = (weights["regression_layer.weight"] @ last).view(objectives, quantiles).mean(-1)
            rewards = mean @ weights["reward_transform_matrix"]
            pattern = scorer.tokenizer.encode("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
            pattern = [t for t in pattern if t != scorer.tokenizer.bos_token_id]
            start = max(i for i in range(len(ids)) if ids[i : i + len(pattern)] == pattern)
            x = hidden[start]
            for block in (0, 3, 6):
                x = F.relu(F.linear(x, weights[f"gating.layers.{block}.weight"]))
                bn = f"gating.layers.{block + 2}"
                x = (x - weights[f"{bn}.running_mean"]) / torch.sqrt(weights[f"{bn}.running_var"] + 1e-5)
                x = x * weights[f"{bn}.weight"] + weights[f"{bn}.bias"]
            logits = F.linear(x, weights["gating.layers.9.weight"], weights["gating.layers.9.bias"])
            gate = torch.softmax(logits / config["gating_temperature"], -1) * weights["gating.logit_scale"][0]
            expected.append(float((gate * rewards).sum()))
    got = scorer.score(CONVERSATIONS)
    assert got == pytest.approx(expected, abs=1e-4)
    assert len({round(v, 3) for v in got}) == len(got)  # the replica's rewards tell answers apart
    assert not all(0 < v < 1 for v in got)  # raw rewards: no sigmoid squashed them into (0, 1)


def test_qrm_gates_on_the_last_assistant_header(scorers):
    from carevl.backends.reward_heads import gating_position

    scorer = scorers["qrm-llama3.1-8b"]
    ids = scorer.token_ids(CONVERSATIONS[0])
    at = gating_position(ids, scorer.gating_pattern)
    assert scorer.tokenizer.decode(ids[at : at + len(scorer.gating_pattern)]) == QRM_GATING_TEXT
    assert scorer.tokenizer.decode(ids[:at]).endswith(CONVERSATIONS[0][0]["content"])  # the user turn's end
    assert gating_position(ids[:at], scorer.gating_pattern) is None
    # a conversation without an assistant turn has nothing to gate on: no score, counted by the stage
    assert scorer.score([CONVERSATIONS[0][:1], CONVERSATIONS[0]])[0] is None


def test_templates_keep_one_bos_and_the_real_turn_layout(scorers):
    gemma = scorers["skywork-reward-gemma-2-27b-v0.2"]
    ids = gemma.token_ids(CONVERSATIONS[0])
    bos = gemma.tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1
    assert "<start_of_turn>model\n" in gemma.tokenizer.decode(ids)
    llama = scorers["skywork-reward-llama-3.1-8b-v0.2"]
    assert llama.tokenizer.decode(llama.token_ids(CONVERSATIONS[0])).startswith(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    )


def test_unknown_family_is_refused(replicas):
    with pytest.raises(ValueError, match="family must be one of"):
        load_reward_model(str(replicas["qrm-llama3.1-8b"]), "armo")


def test_device_auto_places_the_model_by_device_map_and_scores_the_same(replicas, scorers):
    """device: auto hands placement to transformers' device_map (a 70B expert over a node's GPUs;
    the layers are never split inside: `_no_split_modules` comes with the Llama body)."""
    from carevl.backends.hf import HFReward

    name = "inf-orm-llama3.1-70b"
    placed = HFReward(str(replicas[name]), family="inf_orm", device="auto", batch_size=3)
    assert set(placed.model._no_split_modules) == {"LlamaDecoderLayer"} and placed.device.type == "cpu"
    assert placed.score(CONVERSATIONS) == pytest.approx(scorers[name].score(CONVERSATIONS), abs=1e-5)
