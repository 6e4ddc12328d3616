"""GPT-2 adapter: GPT2LMHeadModel -> DecoderSpec (pre-LN, learned positions, fused QKV Conv1D)."""

from __future__ import annotations

from transformers import GPT2Config, GPT2LMHeadModel

from ..graph import WeightRef
from .adapter import Adapter, DecoderSpec, LayerSpec, norm_refs

# HF activation names -> IR activation fns
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


class GPT2Adapter(Adapter):
    family = "gpt2"
    config_class = GPT2Config
    model_class = GPT2LMHeadModel

    def check(self, model) -> list[str]:
        c = model.config
        problems = []
        if c.add_cross_attention:
            problems.append("transformer.h.*.crossattention: cross-attention (add_cross_attention=True) is not supported")
        if c.activation_function not in ACTIVATIONS:
            problems.append(f"transformer.h.*.mlp.act: activation_function={c.activation_function!r} is not "
                            f"supported; allowed: {', '.join(ACTIVATIONS)}")
        return problems

    def describe(self, model) -> DecoderSpec:
        c = model.config
        D, F = c.n_embd, c.n_inner or 4 * c.n_embd
        tied = model.lm_head.weight is model.transformer.wte.weight
        spec = DecoderSpec(
            d_model=D, n_head=c.n_head, d_ffn=F, vocab=c.vocab_size, max_positions=c.n_positions,
            eps=c.layer_norm_epsilon, activation=ACTIVATIONS[c.activation_function],
            token_embed=WeightRef("transformer.wte.weight"), token_module="transformer.wte",
            pos_embed=WeightRef("transformer.wpe.weight"), pos_module="transformer.wpe", pos_offset=0,
            final_norm=norm_refs("transformer.ln_f"), final_norm_module="transformer.ln_f",
            unembed=WeightRef("transformer.wte.weight" if tied else "lm_head.weight"),
            unembed_module="lm_head",
        )
        for i in range(c.n_layer):
            p = f"transformer.h.{i}"
            scale = (D // c.n_head) ** -0.5 if c.scale_attn_weights else 1.0
            if c.scale_attn_by_inverse_layer_idx:
                scale /= float(i + 1)
            qkv = [_conv1d(f"{p}.attn.c_attn", rows=(j * D, (j + 1) * D)) for j in range(3)]
            spec.layers.append(LayerSpec(
                refs={"ln_attn": norm_refs(f"{p}.ln_1"), "q": qkv[0], "k": qkv[1], "v": qkv[2],
                      "o": _conv1d(f"{p}.attn.c_proj"), "ln_mlp": norm_refs(f"{p}.ln_2"),
                      "mlp_in": _conv1d(f"{p}.mlp.c_fc"), "mlp_out": _conv1d(f"{p}.mlp.c_proj")},
                modules={"ln_attn": f"{p}.ln_1", "q": f"{p}.attn.c_attn", "k": f"{p}.attn.c_attn",
                         "v": f"{p}.attn.c_attn", "attention": f"{p}.attn", "o": f"{p}.attn.c_proj",
                         "ln_mlp": f"{p}.ln_2", "mlp_in": f"{p}.mlp.c_fc", "mlp_out": f"{p}.mlp.c_proj",
                         "block": p},
                scale=scale,
            ))
        return spec



def _conv1d(module: str, rows=None) -> dict[str, WeightRef]:
    """Conv1D stores weight as [in, out]: the IR reads it transposed to [out, in]."""
    return {"weight": WeightRef(f"{module}.weight", transpose=True, rows=rows),
            "bias": WeightRef(f"{module}.bias", rows=rows)}
