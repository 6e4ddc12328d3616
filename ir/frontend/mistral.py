"""Mistral adapter: MistralForCausalLM is a LLaMA whose attention may have a sliding window;
the window is an attention attribute, and a TinT longer than the window is refused
(tintc.pipeline) since the construction has no window."""

from __future__ import annotations

from transformers import MistralConfig, MistralForCausalLM

from .llama import LlamaAdapter


class MistralAdapter(LlamaAdapter):
    family = "mistral"
    config_class = MistralConfig
    model_class = MistralForCausalLM

    def attention_extras(self, model, layer: int) -> dict:
        window = getattr(model.config, "sliding_window", None)
        return {} if window is None else {"window": int(window)}
