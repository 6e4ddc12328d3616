"""OPT adapter: OPTForCausalLM (pre-LN) -> DecoderSpec. Positions are offset by 2; q is scaled
by head_dim**-0.5 in HF before attention, which the IR writes as the attention score scale."""

from __future__ import annotations

from transformers import OPTConfig, OPTForCausalLM

from ..graph import WeightRef
from .adapter import Adapter, DecoderSpec, LayerSpec, norm_refs
from .gpt2 import ACTIVATIONS

POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding reserves the first two rows


class OPTAdapter(Adapter):
    family = "opt"
    config_class = OPTConfig
    model_class = OPTForCausalLM

    def check(self, model) -> list[str]:
        c = model.config
        problems = []
        if not c.do_layer_norm_before:
            problems.append("model.decoder.layers.*: do_layer_norm_before=False (post-layer-norm, e.g. "
                            "OPT-350m) is not supported yet; allowed: do_layer_norm_before=True")
        if c.word_embed_proj_dim != c.hidden_size:
            problems.append(f"model.decoder.project_in/project_out: word_embed_proj_dim={c.word_embed_proj_dim} "
                            f"differs from hidden_size={c.hidden_size}; projected embeddings are not supported")
        if c.do_layer_norm_before and model.model.decoder.final_layer_norm is None:  # post-LN has none
            problems.append("model.decoder.final_layer_norm: missing (_remove_final_layer_norm=True) is not supported")
        if not c.layer_norm_elementwise_affine:
            problems.append("model.decoder.layers.*.self_attn_layer_norm: layer_norm_elementwise_affine=False "
                            "is not supported; allowed: True")
        if c.activation_function not in ACTIVATIONS:
            problems.append(f"model.decoder.layers.*.activation_fn: activation_function={c.activation_function!r} "
                            f"is not supported; allowed: {', '.join(ACTIVATIONS)}")
        return problems

    def describe(self, model) -> DecoderSpec:
        c = model.config
        D, dec = c.hidden_size, "model.decoder"
        tied = model.lm_head.weight is model.model.decoder.embed_tokens.weight
        eps = model.model.decoder.final_layer_norm.eps
        spec = DecoderSpec(
            d_model=D, n_head=c.num_attention_heads, d_ffn=c.ffn_dim, vocab=c.vocab_size,
            max_positions=c.max_position_embeddings, eps=eps, activation=ACTIVATIONS[c.activation_function],
            token_embed=WeightRef(f"{dec}.embed_tokens.weight"), token_module=f"{dec}.embed_tokens",
            pos_embed=WeightRef(f"{dec}.embed_positions.weight"), pos_module=f"{dec}.embed_positions",
            pos_offset=POSITION_OFFSET,
            final_norm=norm_refs(f"{dec}.final_layer_norm"), final_norm_module=f"{dec}.final_layer_norm",
            unembed=WeightRef(f"{dec}.embed_tokens.weight" if tied else "lm_head.weight"), unembed_module="lm_head",
        )
        for i in range(c.num_hidden_layers):
            p = f"{dec}.layers.{i}"
            modules = {"ln_attn": f"{p}.self_attn_layer_norm", "q": f"{p}.self_attn.q_proj",
                       "k": f"{p}.self_attn.k_proj", "v": f"{p}.self_attn.v_proj", "attention": f"{p}.self_attn",
                       "o": f"{p}.self_attn.out_proj", "ln_mlp": f"{p}.final_layer_norm",
                       "mlp_in": f"{p}.fc1", "mlp_out": f"{p}.fc2", "block": p}
            refs = {role: (norm_refs(modules[role]) if role.startswith("ln_") else _linear(modules[role], c.enable_bias))
                    for role in ("ln_attn", "q", "k", "v", "o", "ln_mlp", "mlp_in", "mlp_out")}
            spec.layers.append(LayerSpec(refs, modules, scale=(D // c.num_attention_heads) ** -0.5))
        return spec



def _linear(module: str, bias: bool) -> dict[str, WeightRef]:
    refs = {"weight": WeightRef(f"{module}.weight")}
    if bias:
        refs["bias"] = WeightRef(f"{module}.bias")
    return refs
