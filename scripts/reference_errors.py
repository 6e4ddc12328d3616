"""Approximation error of the paper's default backward rules vs exact GD, at several learning rates.

    python scripts/reference_errors.py examples/gpt2.yaml --length 256 --lr 1e-4 1e-3 1e-2

Not a test: full-size shapes take minutes on 2 cores. Prints one fidelity table per lr.
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console

from tintc.config import load_config
from tintc.oracle.fidelity import example_input, fidelity_rows, render
from tintc.pipeline import load_aux_model, trace
from tintc.oracle.reference import TrainSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    args = parser.parse_args()
    console = Console(width=200)
    cfg = load_config(args.config)
    model = load_aux_model(cfg)
    graph = trace(cfg, model)
    ids, train, labels = example_input(graph.attrs["vocab"], args.length, seed=cfg.model.seed)
    for lr in args.lr:
        settings = TrainSettings.from_config(cfg, graph.attrs["n_layer"])
        settings = TrainSettings(**{**settings.__dict__, "lr": lr})
        start = time.perf_counter()
        rows = fidelity_rows(model, graph, ids, train, settings, labels)
        console.print(render(rows, f"{cfg.model.family} T={args.length} lr={lr:g} ({time.perf_counter() - start:.1f} s)"))


if __name__ == "__main__":
    main()
