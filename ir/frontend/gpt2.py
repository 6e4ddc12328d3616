"""GPT-2 adapter: GPT2LMHeadModel (pre-LN, learned positions, fused q|k|v Conv1D)."""

from __future__ import annotations

from transformers import GPT2Config, GPT2LMHeadModel

from .adapter import Adapter

# HF activation names the IR supports
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu")


class GPT2Adapter(Adapter):
    family = "gpt2"
    config_class = GPT2Config
    model_class = GPT2LMHeadModel
    layers = "transformer.h"
    roles = {"ln_1": "ln_attn", "attn.c_attn": ("q", "k", "v"), "attn.c_proj": "o", "ln_2": "ln_mlp",
             "mlp.c_fc": "mlp_in", "mlp.c_proj": "mlp_out"}

    def check(self, model) -> list[str]:
        c = model.config
        problems = []
        if c.add_cross_attention:
            problems.append("transformer.h.*.crossattention: cross-attention (add_cross_attention=True) is not supported")
        if c.activation_function not in ACTIVATIONS:
            problems.append(f"transformer.h.*.mlp.act: activation_function={c.activation_function!r} is not "
                            f"supported; allowed: {', '.join(ACTIVATIONS)}")
        return problems

    def max_positions(self, model) -> int:
        return model.config.n_positions
