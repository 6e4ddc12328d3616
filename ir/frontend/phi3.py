"""Phi-3 adapter: Phi3ForCausalLM is a Mistral (LLaMA with an optional sliding window) whose
projections are fused: q|k|v rows of one `qkv_proj` (cut by slices) and gate|up rows of one
`gate_up_proj` (cut by a chunk). Each part is a row range of the fused weight, so training one
kind updates only its rows. A window is an attention attribute, refused as Mistral's is."""

from __future__ import annotations

from transformers import Phi3Config, Phi3ForCausalLM

from .mistral import MistralAdapter


class Phi3Adapter(MistralAdapter):
    family = "phi3"
    config_class = Phi3Config
    model_class = Phi3ForCausalLM
    roles = {"input_layernorm": "ln_attn", "self_attn.qkv_proj": ("q", "k", "v"), "self_attn.o_proj": "o",
             "post_attention_layernorm": "ln_mlp", "mlp.gate_up_proj": ("mlp_gate", "mlp_up"),
             "mlp.down_proj": "mlp_down"}
