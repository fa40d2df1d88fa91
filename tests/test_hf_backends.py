"""Hugging Face backends on tiny local models: generation with images, and a tiny
sequence-classification reward model scoring raw, with one BOS token."""

import pytest
import torch

from carevl.backends.interface import Chat, Sampling
from carevl.standins.shapes import judge_items
from tests.helpers import with_qwen2_vl_decoding_defaults


@pytest.fixture(scope="module")
def chat_model(tiny_qwen):
    from carevl.backends.hf import HFChat

    return HFChat(tiny_qwen, name="tiny")


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    from carevl.backends.hf import HFReward
    from carevl.standins.tiny import build_tiny_reward_model

    return HFReward(str(build_tiny_reward_model(tmp_path_factory.mktemp("rm"))), batch_size=2)


def test_generation_returns_n_samples_that_depend_only_on_their_own_chat(chat_model):
    items = judge_items(3, seed=4)
    chats = [Chat.user(item.question, item.image) for item in items]
    sampling = Sampling(n=3, temperature=1.0, max_tokens=6, seed=1)
    together = chat_model.generate(chats, sampling)
    alone = chat_model.generate(chats[1:2], sampling)
    assert [len(r.texts) for r in together] == [3, 3, 3] and all(r.ok for r in together)
    assert alone[0].texts == together[1].texts
    assert len(set(together[0].texts)) > 1  # sampling, not three copies of one text
    greedy = chat_model.generate(chats[:1], Sampling(max_tokens=6))
    assert greedy[0].texts == chat_model.generate(chats[:1], Sampling(max_tokens=6, seed=9))[0].texts


def test_decoding_ignores_the_checkpoints_generation_defaults(chat_model, tiny_qwen, tmp_path):
    from carevl.backends.hf import HFChat

    quirky = with_qwen2_vl_decoding_defaults(tiny_qwen, tmp_path / "quirky", repetition_penalty=5.0)
    quirky = HFChat(str(quirky), name="quirky")
    chats = [Chat.user(item.question, item.image) for item in judge_items(2, seed=4)]
    for sampling in (Sampling(max_tokens=16), Sampling(n=2, temperature=1.0, max_tokens=16, seed=1)):
        assert [r.texts for r in quirky.generate(chats, sampling)] == [
            r.texts for r in chat_model.generate(chats, sampling)
        ]


def test_corrupt_image_fails_that_chat_only(chat_model):
    item = judge_items(1, seed=4)[0]
    replies = chat_model.generate(
        [Chat.user("q", item.image[:50]), Chat.user(item.question, item.image)], Sampling(max_tokens=3)
    )
    assert replies[0].error.startswith("bad_input") and replies[1].ok


def conversation(answer):
    return [
        {"role": "user", "content": "What colour are the shapes?\n\nImage description: two red circles"},
        {"role": "assistant", "content": answer},
    ]


def test_reward_scores_are_the_raw_logit_with_one_bos(reward_model):
    from carevl.standins.tiny import BOS

    conversations = [
        conversation("The shapes are red."),
        conversation("Blue."),
        conversation("The shapes are blue, I think."),
    ]
    scores = reward_model.score(conversations)
    bos = reward_model.tokenizer.convert_tokens_to_ids(BOS)
    for conv, score in zip(conversations, scores):
        ids = reward_model.token_ids(conv)
        assert ids[0] == bos and ids.count(bos) == 1
        with torch.no_grad():
            logit = reward_model.model(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert score == pytest.approx(logit, abs=1e-5)  # no sigmoid, padding changes nothing
    # the trap avoided: tokenising the rendered template adds a second BOS
    text = reward_model.tokenizer.apply_chat_template(conversations[0], tokenize=False)
    assert reward_model.tokenizer(text)["input_ids"][:2] == [bos, bos]


def test_reward_model_marks_over_length_conversations_unscored(reward_model):
    short = conversation("Red.")
    reward_model.max_length, saved = len(reward_model.token_ids(short)), reward_model.max_length
    try:
        scores = reward_model.score([short, conversation("Red. " * 40)])
    finally:
        reward_model.max_length = saved
    assert isinstance(scores[0], float) and scores[1] is None
