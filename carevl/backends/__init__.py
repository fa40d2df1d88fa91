"""Implementations of `carevl.inference.ChatModel` and `RewardModel`; each imports its heavy
dependency (openai, transformers, vllm) only when built."""
