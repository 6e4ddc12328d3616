"""Time `trace` on full-size shapes with random weights: GPT-2 (124M) and OPT-125M.

Not a test. Run from the repository root:  python bench/trace_full_size.py [--repeat N]
Model construction is timed separately from tracing; tracing includes the adapter checks,
graph build, verify against the parameters and the logit check (8 tokens, batch 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from ir.frontend import build_model, trace  # noqa: E402

FULL_SIZE = {
    "gpt2": ("gpt2", {}),  # GPT2Config() defaults: 12 layers, 768 wide, vocab 50257
    "opt-125m": ("opt", dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                             vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=768)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="trace runs per model (best is reported)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = []
    for label, (family, kwargs) in FULL_SIZE.items():
        start = time.perf_counter()
        model = build_model(family, kwargs, seed=0)
        build_s = time.perf_counter() - start
        n_params = sum(p.numel() for p in model.parameters())
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            graph = trace(model, label)
            times.append(time.perf_counter() - start)
        rows.append((label, n_params / 1e6, len(graph), len(graph.weight_shapes), build_s, min(times), max(times)))
        del model
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, trace runs per model: {args.repeat}")
    header = f"{'model':<10} {'params':>8} {'ops':>5} {'weights':>8} {'build s':>8} {'trace s (best)':>15} {'(worst)':>8}"
    print(header)
    print("-" * len(header))
    for label, mparams, ops, weights, build_s, best, worst in rows:
        print(f"{label:<10} {mparams:>7.1f}M {ops:>5} {weights:>8} {build_s:>8.2f} {best:>15.3f} {worst:>8.3f}")


if __name__ == "__main__":
    main()
