"""Inference: the engine (prefill, KV-cache decode, sampling, beam search, streaming, scoring), chat rollouts
with tool calls, and the `sample` and `chat` commands. Training stages, evaluation, serving and the
application layer all generate through it."""
