"""The shared table of tiny test configs, one row per model family, and a builder.

A new family = one adapter file + one row here. `tiny_model` builds a seeded, randomly
initialised HF model from the row (never downloads anything).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # conftest.py sets it too; this keeps direct imports safe

import torch  # noqa: E402

from ir.frontend import build_model  # noqa: E402

TINY: dict[str, dict] = {
    "gpt2": dict(
        n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ),
    "opt": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, vocab_size=64,
        max_position_embeddings=32, word_embed_proj_dim=32,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ),
    # LLaMA-style rows: grouped-query attention (4 query heads, 2 k/v heads), tied embeddings
    "llama": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ),
    "qwen2": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ),
    "mistral": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32, sliding_window=None,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ),
    # Pythia's layout: parallel residual, a quarter of each head rotated, an untied head
    "gpt_neox": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
        max_position_embeddings=32, rotary_pct=0.25, use_parallel_residual=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ),
    # Phi-3: q|k|v rows of one qkv_proj (grouped-query), gate|up rows of one gate_up_proj
    "phi3": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ),
    # OLMo 2: RMSNorm on each sublayer's output before the residual add; q/k RMSNorm over the projection
    "olmo2": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ),
    # Qwen3: RMSNorm of each q and k head (one gain of head_dim); head_dim 16, not hidden/heads = 8
    "qwen3": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=64, max_position_embeddings=32, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ),
    # BLOOM: ALiBi (no position embedding), a layer norm on the embeddings, q|k|v interleaved per head in
    # one query_key_value, BLOOM's tanh GELU, a tied head
    "bloom": dict(
        hidden_size=32, n_layer=2, n_head=4, vocab_size=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ),
    # Gemma 2: (1 + w) RMSNorms before and after each sublayer, embeddings × √D, tanh-GELU gate, a head_dim of its
    # own (16, not 32/4) and a score scale from query_pre_attn_scalar; a sliding window (as long as the TinT) on
    # alternate layers; attention logits soft-capped at 0.5, where tanh bends (|s|/c up to 3.2 with weights of
    # std 0.1: median 0.42); final logits soft-capped at 1.0, where tanh bends too (|z|/c up to 2.0, median 0.39)
    "gemma2": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, query_pre_attn_scalar=10, vocab_size=64, max_position_embeddings=32, sliding_window=32,
        initializer_range=0.1, attn_logit_softcapping=0.5, final_logit_softcapping=1.0,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ),
}

# Smaller still, for the standard view (backends/torch/standard.py), whose dense projections
# over the whole stream grow with width × calls.
MICRO: dict[str, dict] = {
    "gpt2": dict(n_embd=16, n_layer=2, n_head=2, vocab_size=32, n_positions=16,
                 bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "opt": dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64, vocab_size=32,
                max_position_embeddings=16, word_embed_proj_dim=16, bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "llama": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=32, max_position_embeddings=16, tie_word_embeddings=True,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "gpt_neox": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=32,
                     max_position_embeddings=16, rotary_pct=0.5, use_parallel_residual=True,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "gemma2": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=12, query_pre_attn_scalar=10, vocab_size=32, max_position_embeddings=16,
                   sliding_window=16, initializer_range=0.1, attn_logit_softcapping=0.5, final_logit_softcapping=1.0,
                   bos_token_id=0, eos_token_id=0, pad_token_id=0),
}


def tiny_model(family: str, dtype=torch.float32, seed: int = 0, table: dict = TINY, **overrides):
    """A tiny HF model of `family` (table[family] updated by `overrides`), in eval mode. Gemma 2 initialises
    its norm weights w to 0 (gain 1 + w = 1), which would hide a misread gain: they get N(0, 0.1²) here."""
    model = build_model(family, {**table[family], **overrides}, seed=seed, dtype=dtype)
    if family in ZERO_NORM_WEIGHTS:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return model


ZERO_NORM_WEIGHTS = ("gemma2",)  # families whose norm weights start at 0 (an offset gain)


def paper_rules(approximations):
    """A test's `tint.approximations`: a word as is (exact, paper), a mapping over the paper's rules."""
    from tintc.config.schema import RULE_SETS

    return approximations if isinstance(approximations, str) else {**RULE_SETS["paper"], **approximations}


def tiny_config(family: str, table: dict = TINY, **tint):
    """A TintcConfig for the table[family] model; `tint` sets keys of the tint section
    (e.g. steps=2 goes under train, dtype=... at the top of tint). The tests mean the paper's rules
    unless they name others: `approximations` defaults to `paper` (the config's own default is
    `exact`), and a mapping changes only the rules it names (paper_rules)."""
    import json

    from tintc.config import parse_config

    train_keys = {"layers", "steps", "lr", "loss", "kinds"}
    train = {k: v for k, v in tint.items() if k in train_keys}
    rest = {k: v for k, v in tint.items() if k not in train_keys}
    rest["approximations"] = paper_rules(rest.get("approximations", "paper"))
    section = {"prefixes": 8, "max_length": 32, **rest, "train": {"lr": 0.05, **train}}
    text = json.dumps({"model": {"family": family, "config": table[family]}, "tint": section})
    return parse_config(text)  # JSON is YAML
