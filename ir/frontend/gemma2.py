"""Gemma 2 adapter: Gemma2ForCausalLM is a LLaMA-like model with RMSNorms of gain 1 + w (the trained
tensor is w), norms before and after each sublayer (input/post_attention, pre/post_feedforward), token
embeddings times √D (a buffer, read as the model rounds it), a tanh-GELU gated MLP, the score scale
query_pre_attn_scalar^-1/2, a head_dim of its own, eager attention (the trace reads it op by op) and a
sliding window on alternate layers (an attention attribute there; a window shorter than the TinT is
refused as Mistral's is), attention logits soft-capped c·tanh(s/c) (eager.py reads it, the backend stores
the scores) and final logits soft-capped the same way (recognize.py: the lm_head op's `softcap`)."""

from __future__ import annotations

from transformers import Gemma2Config, Gemma2ForCausalLM

from .llama import LlamaAdapter


class Gemma2Adapter(LlamaAdapter):
    family = "gemma2"
    config_class = Gemma2Config
    model_class = Gemma2ForCausalLM
    roles = {"input_layernorm": "ln_attn", "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
             "self_attn.o_proj": "o", "post_attention_layernorm": "ln_attn_out", "pre_feedforward_layernorm": "ln_mlp",
             "mlp.gate_proj": "mlp_gate", "mlp.up_proj": "mlp_up", "mlp.down_proj": "mlp_down",
             "post_feedforward_layernorm": "ln_mlp_out"}
    activations = ("gelu_pytorch_tanh",)  # hidden_activation values the IR supports
    activation_key = "hidden_activation"
    per_layer_attrs = ("layer_type", "sliding_window")  # alternate layers: attention_extras reads the window

    def check(self, model) -> list[str]:
        problems = super().check(model)
        if getattr(model.config, "use_bidirectional_attention", None):
            problems.append("model.layers.*.self_attn: use_bidirectional_attention=True is not supported; allowed: "
                            "causal attention (null or false)")
        return problems

    def embed_scale(self, model) -> float:
        embedding = model.model.embed_tokens
        return float(embedding.embed_scale.to(embedding.weight.dtype))

    def attention_extras(self, model, layer: int) -> dict:
        window = model.config.sliding_window
        sliding = model.config.layer_types[layer] == "sliding_attention"
        return {"window": int(window)} if sliding and window is not None else {}
