"""OPT adapter: OPTForCausalLM, pre-LN (OPT-125m) or post-LN with project_in/out (OPT-350m).
Positions are offset by 2; HF scales q by head_dim**-0.5 before attention, which the trace
folds into the attention score scale."""

from __future__ import annotations

from transformers import OPTConfig, OPTForCausalLM

from .adapter import Adapter
from .gpt2 import ACTIVATIONS


class OPTAdapter(Adapter):
    family = "opt"
    config_class = OPTConfig
    model_class = OPTForCausalLM
    layers = "model.decoder.layers"
    roles = {"self_attn_layer_norm": "ln_attn", "self_attn.q_proj": "q", "self_attn.k_proj": "k",
             "self_attn.v_proj": "v", "self_attn.out_proj": "o", "final_layer_norm": "ln_mlp",
             "fc1": "mlp_in", "fc2": "mlp_out"}
    outer_roles = {"model.decoder.project_in": "project_in", "model.decoder.project_out": "project_out"}
    position_offset = 2  # OPTLearnedPositionalEmbedding reserves the first two rows

    def check(self, model) -> list[str]:
        c = model.config
        problems = []
        if c.do_layer_norm_before and model.model.decoder.final_layer_norm is None:  # post-LN has none
            problems.append("model.decoder.final_layer_norm: missing (_remove_final_layer_norm=True) is not supported")
        if not c.layer_norm_elementwise_affine:
            problems.append("model.decoder.layers.*.self_attn_layer_norm: layer_norm_elementwise_affine=False "
                            "is not supported; allowed: True")
        if c.activation_function not in ACTIVATIONS:
            problems.append(f"model.decoder.layers.*.activation_fn: activation_function={c.activation_function!r} "
                            f"is not supported; allowed: {', '.join(ACTIVATIONS)}")
        return problems
