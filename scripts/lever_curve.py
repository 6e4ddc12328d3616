"""The standard view's dense counts with each stream-narrowing lever alone and all together, for one
model config at one max length: D_sim, dense ÷ D_sim (the rows the blocks hold) and dense, in both
conventions (tintc/report/dense_count.py).

Not a test. Run from the repository root, alone on the machine:
    python scripts/lever_curve.py examples/opt-125m.yaml --length 256
Levers (tint.passes keys): shared_rows (prefix rows on token coordinates), split_mlp (an FFN as F/D
sub-MLPs of width D), wide_heads (head_splitting.width = D: one head per weight-row slot, its whole row),
attention_rows (the stop-gradient backward's attention rows D/T heads at a time), unstacked
(prefix_stacking off: one weight row per prefix token, K = Dout, so one head per simulated map),
rematerialise (the backward recomputes each layer's forward from its input: narrows the stream in our
convention, widens the reference's, whose backward reads what the forward kept; so the rows end with the
five other levers together, examples/gpt2-compact.yaml, and all six).
The counts come from shapes: no dense matrix is built.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tintc import pipeline  # noqa: E402
from tintc.config import load_config  # noqa: E402
from tintc.report.dense_count import dense_counts  # noqa: E402

LEVERS = ("shared_rows", "split_mlp", "wide_heads", "attention_rows", "unstacked", "rematerialise")


def _set(cfg, levers: tuple[str, ...], hidden: int) -> None:
    passes = cfg.tint.passes
    passes.shared_rows.enabled = "shared_rows" in levers
    passes.split_mlp.enabled = "split_mlp" in levers
    passes.head_splitting.width = hidden if "wide_heads" in levers else None
    passes.attention_rows.enabled = "attention_rows" in levers
    passes.prefix_stacking.enabled = "unstacked" not in levers
    passes.rematerialise.enabled = "rematerialise" in levers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args()
    cfg = load_config(args.config)
    cfg.tint.max_length = args.length
    model = pipeline.load_aux_model(cfg)
    hidden = pipeline.aux_config(cfg).hidden_size
    print("| levers | blocks | D_sim ours | dense ours | D_sim ref. conv. | working set | apart | prefix rows | "
          "dense ÷ D_sim | dense ref. conv. | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for levers in [(), *((lever,) for lever in LEVERS), LEVERS[:-1], LEVERS]:
        _set(cfg, levers, hidden)
        start = time.perf_counter()
        compiled = pipeline.compile_tint(cfg, model)
        counts = dense_counts(compiled.tint.program, compiled.tint.layers)
        ours, ref = counts["ours"], counts["reference_convention"]
        dense = ref["dense"]["total"]
        print(f"| {' + '.join(levers) or 'none'} | {counts['blocks']:,} | {ours['d_sim']:,} | "
              f"{ours['dense']['total']:.4g} | {ref['d_sim']:,} | {ref['working_set']:,} | "
              f"{ref['working_set_apart']:,} | {ref['prefix_rows']:,} | {dense / ref['d_sim'] / 1e6:.2f}M | "
              f"{dense:,} | {time.perf_counter() - start:.1f} |", flush=True)


if __name__ == "__main__":
    main()
