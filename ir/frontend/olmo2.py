"""OLMo 2 adapter: Olmo2ForCausalLM is a LLaMA whose norms come after each sublayer, on its
output before the residual add (`post_attention_layernorm`, `post_feedforward_layernorm`), and
whose q and k are RMS-normalised over the whole projection (`q_norm`, `k_norm`) before the
rotary embedding. The trace finds where each norm sits; the roles name them."""

from __future__ import annotations

from transformers import Olmo2Config, Olmo2ForCausalLM

from .llama import LlamaAdapter


class Olmo2Adapter(LlamaAdapter):
    family = "olmo2"
    config_class = Olmo2Config
    model_class = Olmo2ForCausalLM
    roles = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
             "self_attn.q_norm": "ln_q", "self_attn.k_norm": "ln_k", "post_attention_layernorm": "ln_attn_out",
             "mlp.gate_proj": "mlp_gate", "mlp.up_proj": "mlp_up", "mlp.down_proj": "mlp_down",
             "post_feedforward_layernorm": "ln_mlp_out"}
