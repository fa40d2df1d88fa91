"""Inference backends: the interfaces (`carevl.backends.interface`) and their implementations, each
importing its heavy dependency (openai, transformers, vllm) only when built."""
