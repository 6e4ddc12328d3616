"""LLaMA adapter: LlamaForCausalLM (also SmolLM2): RMSNorm, rotary positions, grouped-query
attention, SiLU-gated MLP; tied or untied embeddings. Qwen2 and Mistral reuse it."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

from .adapter import Adapter

ROPE_TYPES = ("default",)  # rope_parameters["rope_type"] values the IR computes


class LlamaAdapter(Adapter):
    family = "llama"
    config_class = LlamaConfig
    model_class = LlamaForCausalLM
    layers = "model.layers"
    roles = {"input_layernorm": "ln_attn", "self_attn.q_proj": "q", "self_attn.k_proj": "k",
             "self_attn.v_proj": "v", "self_attn.o_proj": "o", "post_attention_layernorm": "ln_mlp",
             "mlp.gate_proj": "mlp_gate", "mlp.up_proj": "mlp_up", "mlp.down_proj": "mlp_down"}
    activations = ("silu",)  # hidden_act values the IR supports
    activation_key = "hidden_act"  # the config key that names the MLP's activation
    norm_bias = False  # RMSNorm

    def check(self, model) -> list[str]:
        c = model.config
        problems = []
        rope = _rope_parameters(c)
        if rope.get("rope_type", "default") not in ROPE_TYPES:
            problems.append(f"model.rotary_emb: rope_parameters.rope_type={rope.get('rope_type')!r} (rope scaling) "
                            f"is not supported; allowed: {', '.join(ROPE_TYPES)}")
        act = getattr(c, self.activation_key)
        if act not in self.activations:
            problems.append(f"model.layers.*.mlp.act_fn: {self.activation_key}={act!r} is not supported; "
                            f"allowed: {', '.join(self.activations)}")
        return problems

    def rope_theta(self, model) -> float:
        return float(_rope_parameters(model.config)["rope_theta"])


def _rope_parameters(config) -> dict:
    """transformers 5 keeps rotary settings in `rope_parameters` (older configs: `rope_theta`)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" not in rope and getattr(config, "rope_theta", None) is not None:
        rope = {**rope, "rope_theta": config.rope_theta}
    return rope
