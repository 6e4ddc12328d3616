"""GPT-NeoX adapter: GPTNeoXForCausalLM (Pythia): pre-LN with biased layer norms, partial rotary
positions (rotary_pct), q|k|v fused and interleaved per head, a GELU MLP, parallel residual or not
(both from the trace), an untied output head."""

from __future__ import annotations

from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from .adapter import Adapter
from .gpt2 import ACTIVATIONS
from .llama import ROPE_TYPES, _rope_parameters


class GPTNeoXAdapter(Adapter):
    family = "gpt_neox"
    config_class = GPTNeoXConfig
    model_class = GPTNeoXForCausalLM
    layers = "gpt_neox.layers"
    roles = {"input_layernorm": "ln_attn", "attention.query_key_value": ("q", "k", "v"), "attention.dense": "o",
             "post_attention_layernorm": "ln_mlp", "mlp.dense_h_to_4h": "mlp_in", "mlp.dense_4h_to_h": "mlp_out"}
    config_keys = ("rotary_pct", "rotary_emb_base")  # Pythia's config.json names; GPTNeoXConfig reads them

    def check(self, model) -> list[str]:
        c = model.config
        problems = []
        rope = _rope_parameters(c)
        if rope.get("rope_type", "default") not in ROPE_TYPES:
            problems.append(f"gpt_neox.rotary_emb: rope_parameters.rope_type={rope.get('rope_type')!r} (rope scaling) "
                            f"is not supported; allowed: {', '.join(ROPE_TYPES)}")
        if c.hidden_act not in ACTIVATIONS:
            problems.append(f"gpt_neox.layers.*.mlp.act: hidden_act={c.hidden_act!r} is not supported; "
                            f"allowed: {', '.join(ACTIVATIONS)}")
        return problems

    def rope_theta(self, model) -> float:
        return float(_rope_parameters(model.config)["rope_theta"])
