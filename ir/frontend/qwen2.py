"""Qwen2 adapter: Qwen2ForCausalLM is a LLaMA with q, k, v biases (the trace finds them)."""

from __future__ import annotations

from transformers import Qwen2Config, Qwen2ForCausalLM

from .llama import LlamaAdapter


class Qwen2Adapter(LlamaAdapter):
    family = "qwen2"
    config_class = Qwen2Config
    model_class = Qwen2ForCausalLM

    def check(self, model) -> list[str]:
        problems = super().check(model)
        if getattr(model.config, "use_sliding_window", False):
            problems.append("model.layers.*.self_attn: use_sliding_window=True is not supported; allowed: False")
        return problems
