"""Qwen3 adapter: Qwen3ForCausalLM is a Qwen2 (a LLaMA; sliding windows refused) whose q and k
are RMS-normalised per head (`q_norm`, `k_norm`: one gain of head_dim shared by every head) before
the rotary embedding, and whose head_dim need not be hidden/heads. The trace finds the per-head
norm (an rms_norm with `heads`); the roles name it as OLMo 2's whole-projection q/k norms."""

from __future__ import annotations

from transformers import Qwen3Config, Qwen3ForCausalLM

from .qwen2 import Qwen2Adapter


class Qwen3Adapter(Qwen2Adapter):
    family = "qwen3"
    config_class = Qwen3Config
    model_class = Qwen3ForCausalLM
    roles = {**Qwen2Adapter.roles, "self_attn.q_norm": "ln_q", "self_attn.k_norm": "ln_k"}
