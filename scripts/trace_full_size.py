"""Time `trace` on full-size shapes with random weights: GPT-2 (124M), OPT-125M and a
SmolLM2-135M-shaped LLaMA (30 layers).

Not a test. Run from the repository root:

    python scripts/trace_full_size.py [--repeat N] [--threads N] [--against DIR] [--models a,b]

Tracing includes the adapter checks, graph build, verify against the parameters and the
logit check (8 tokens, batch 1). Each side runs in its own worker process that builds the
models once; the workers take turns, one trace each per round, so every side sees the same
load (the machine may be shared). Sides: `new` (this checkout's `trace`), `whole` (this
checkout exporting every layer: `trace(..., whole=True)`), and with `--against DIR` `old`,
the frontend of another checkout (e.g. `git worktree add /tmp/old b8deae1`; it must offer
`build_model` and `trace`, and only times the families it knows).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent

FULL_SIZE = {
    "gpt2": ("gpt2", {}),  # GPT2Config() defaults: 12 layers, 768 wide, vocab 50257
    "opt-125m": ("opt", dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                             vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=768)),
    "smollm2-135m": ("llama", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                                   max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
                                   rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)),
}


def worker(root: str, labels: list[str], threads: int) -> None:
    """Build the models, then answer each stdin line `LABEL WHOLE` with one trace's seconds."""
    sys.path.insert(0, root)
    import torch

    import ir.frontend as frontend

    torch.set_num_threads(threads)
    models = {}
    for label in labels:
        family, kwargs = FULL_SIZE[label]
        if family in frontend.ADAPTERS:
            models[label] = frontend.build_model(family, kwargs, seed=0)
    print("ready " + " ".join(models), flush=True)
    for line in sys.stdin:
        label, whole = line.split()
        model = models[label]
        kwargs = {"whole": True} if whole == "1" else {}
        start = time.perf_counter()
        graph = frontend.trace(model, label, **kwargs)
        seconds = time.perf_counter() - start
        print(f"{seconds} {len(graph)} {len(graph.weight_shapes)}", flush=True)


class Side:
    def __init__(self, name: str, root: Path, whole: bool, labels: list[str], threads: int):
        self.name, self.whole = name, whole
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", str(root), "--models", ",".join(labels),
                                      "--threads", str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env={**os.environ, "PYTHONPATH": str(root)})
        self.labels = self.proc.stdout.readline().split()[1:]
        self.times: dict[str, list[float]] = {label: [] for label in self.labels}
        self.sizes: dict[str, str] = {}

    def time(self, label: str) -> None:
        self.proc.stdin.write(f"{label} {int(self.whole)}\n")
        self.proc.stdin.flush()
        seconds, ops, weights = self.proc.stdout.readline().split()
        self.times[label].append(float(seconds))
        self.sizes[label] = f"{ops} ops, {weights} weights"

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds: traces per model and side")
    parser.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1), help="torch threads per worker")
    parser.add_argument("--against", type=Path, help="another checkout whose frontend is timed as side `old`")
    parser.add_argument("--models", default=",".join(FULL_SIZE), help="comma-separated: " + ", ".join(FULL_SIZE))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    labels = args.models.split(",")
    if args.worker:
        worker(args.worker, labels, args.threads)
        return
    sides = [Side("new", ROOT, False, labels, args.threads), Side("whole", ROOT, True, labels, args.threads)]
    if args.against:
        sides.insert(0, Side("old", args.against.resolve(), False, labels, args.threads))
    for _ in range(args.repeat):
        for label in labels:
            for side in sides:
                if label in side.labels:
                    side.time(label)
    for side in sides:
        side.close()
    print(f"{args.threads} torch threads per worker, {args.repeat} rounds, load average "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    # paired: the ratio to old within each round (the same load), then its median
    header = f"{'model':<13} {'side':<6} {'best s':>7} {'median s':>9} {'best / old':>11} {'paired / old':>13}  graph"
    print(header)
    print("-" * len(header))
    for label in labels:
        old = next((s.times[label] for s in sides if s.name == "old" and label in s.labels), None)
        for side in sides:
            if label not in side.labels:
                continue
            times = side.times[label]
            best, median = min(times), statistics.median(times)
            ratio = f"{best / min(old):.2f}" if old else "-"
            paired = f"{statistics.median(t / o for t, o in zip(times, old)):.2f}" if old else "-"
            print(f"{label:<13} {side.name:<6} {best:>7.3f} {median:>9.3f} {ratio:>11} {paired:>13}  "
                  f"{side.sizes[label]}")


if __name__ == "__main__":
    main()
