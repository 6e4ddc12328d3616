"""BLOOM adapter: BloomForCausalLM: a layer norm on the embeddings (`word_embeddings_layernorm`), no
position embedding but ALiBi (each head's scores get m_h·j for key j: eager attention written out as
baddbmm, softmax and bmm, recognised in eager_attention.py), q|k|v fused and interleaved per head
(`query_key_value` viewed as [heads, 3, head_dim], each part picked by a select), biased layer norms,
BLOOM's own tanh GELU (gelu_bloom), a tied head."""

from __future__ import annotations

from transformers import BloomConfig, BloomForCausalLM

from .adapter import Adapter

ALIBI_MAX_LENGTH = 4096  # ALiBi sets no limit on the length; this is tintc's (tint.max_length)


class BloomAdapter(Adapter):
    family = "bloom"
    config_class = BloomConfig
    model_class = BloomForCausalLM
    layers = "transformer.h"
    roles = {"input_layernorm": "ln_attn", "self_attention.query_key_value": ("q", "k", "v"),
             "self_attention.dense": "o", "post_attention_layernorm": "ln_mlp", "mlp.dense_h_to_4h": "mlp_in",
             "mlp.dense_4h_to_h": "mlp_out"}
    outer_roles = {"transformer.word_embeddings_layernorm": "ln_embed"}
    layer_returns_tuple = True  # BloomBlock returns (output, attention weights)

    def check(self, model) -> list[str]:
        c = model.config
        problems = []
        if c.apply_residual_connection_post_layernorm:
            problems.append("transformer.h.*: apply_residual_connection_post_layernorm=True (the residual taken "
                            "after the norm) is not supported; allowed: False")
        if c.pretraining_tp > 1 and c.slow_but_exact:
            problems.append(f"transformer.h.*.self_attention.dense: slow_but_exact=True with pretraining_tp="
                            f"{c.pretraining_tp} (the projection summed in slices) is not supported; allowed: "
                            "slow_but_exact=False")
        return problems

    def max_positions(self, model) -> int:
        return ALIBI_MAX_LENGTH

    def attention_extras(self, model, layer: int) -> dict:
        return {"positions": "alibi"}
