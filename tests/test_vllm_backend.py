"""vLLM backends: run only where vLLM and a CUDA device are present (vLLM's own environment)."""

import pytest

vllm = pytest.importorskip("vllm")
torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM needs a CUDA device")]


def test_vllm_reward_is_raw_and_matches_transformers(tmp_path):
    from carevl.backends.hf import HFReward
    from carevl.backends.vllm import VLLMReward
    from carevl.standins.tiny import build_tiny_reward_model

    path = str(build_tiny_reward_model(tmp_path / "rm"))
    conversations = [
        [
            {"role": "user", "content": "What colour?\n\nImage description: a red circle"},
            {"role": "assistant", "content": answer},
        ]
        for answer in ("Red.", "Blue.")
    ]
    expected = HFReward(path).score(conversations)
    got = VLLMReward(path, max_model_len=512, gpu_memory_utilization=0.3).score(conversations)
    assert got == pytest.approx(expected, abs=2e-2)


def test_vllm_chat_generates_n_samples(tiny_qwen):
    from carevl.backends.interface import Chat, Sampling
    from carevl.backends.vllm import VLLMChat
    from carevl.standins.shapes import judge_items

    item = judge_items(1, seed=0)[0]
    replies = VLLMChat(tiny_qwen, max_model_len=512, gpu_memory_utilization=0.3).generate(
        [Chat.user(item.question, item.image)], Sampling(n=2, temperature=1.0, max_tokens=8)
    )
    assert replies[0].ok and len(replies[0].texts) == 2
