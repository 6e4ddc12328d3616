"""The standard view's dense counts against the TinT's max length T: the curve of D_sim and dense
parameters (ours and the reference's convention, plain and factored) for one model config.

Not a test. Run from the repository root, alone on the machine:
    python scripts/dense_count.py examples/opt-125m.yaml --lengths 32,64,128,256
Each length compiles the TinT (no dense matrix is built: the counts come from shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tintc import pipeline  # noqa: E402
from tintc.config import load_config  # noqa: E402
from tintc.report.dense_count import dense_counts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--lengths", default="32,64,128,256")
    args = parser.parse_args()
    cfg = load_config(args.config)
    model = pipeline.load_aux_model(cfg)
    print("| T | blocks | D_sim ours | dense ours | factored ours | D_sim ref. conv. | working set | "
          "dense ref. conv. | factored ref. conv. | seconds |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        cfg.tint.max_length = length
        start = time.perf_counter()
        compiled = pipeline.compile_tint(cfg, model)
        counts = dense_counts(compiled.tint.program, compiled.tint.layers)
        seconds = time.perf_counter() - start
        ours, ref = counts["ours"], counts["reference_convention"]
        print(f"| {length} | {counts['blocks']:,} | {ours['d_sim']:,} | {ours['dense']['total']:.4g} | "
              f"{ours['dense']['factored']:.4g} | {ref['d_sim']:,} | {ref['working_set']:,} | "
              f"{ref['dense']['total']:.4g} | {ref['dense']['factored']:.4g} | {seconds:.1f} |", flush=True)
        ref.pop("edges")
        rows.append({"max_length": length, **counts})
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
