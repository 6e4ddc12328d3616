"""The driver: config -> aux model -> IR -> (passes -> backend, in later stages) -> reports.

Each function is one step of the pipeline; the CLI calls them in order.
"""

from __future__ import annotations

import os
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub

import ir.frontend
from ir.graph import Graph

from .config import TintcConfig
from .fidelity import example_input, fidelity_rows, render
from .reference import TrainSettings


def load_aux_model(cfg: TintcConfig):
    """The auxiliary HF model: built from config kwargs with a seed, or loaded from a local dir."""
    if cfg.resolved_model_path is not None:
        return ir.frontend.load_model(cfg.model.family, cfg.resolved_model_path, dtype=cfg.torch_dtype)
    return ir.frontend.build_model(cfg.model.family, cfg.model.config or {}, cfg.model.seed, cfg.torch_dtype)


def trace(cfg: TintcConfig, model) -> Graph:
    return ir.frontend.trace(model, name=cfg.name)


def summary(graph: Graph) -> dict[str, int]:
    """Op counts by kind."""
    return dict(Counter(node.kind for node in graph.nodes()))


def reference_table(cfg: TintcConfig, length: int | None = None, batch: int = 1):
    """The oracle's fidelity table on a seeded random input (half train, half test)."""
    model = load_aux_model(cfg)
    graph = trace(cfg, model)
    length = length or min(64, graph.attrs["max_positions"])
    input_ids, train_mask, label_mask = example_input(graph.attrs["vocab"], length, batch, seed=cfg.model.seed)
    settings = TrainSettings.from_config(cfg, graph.attrs["n_layer"])
    rows = fidelity_rows(model, graph, input_ids, train_mask, settings, label_mask)
    t = cfg.tint.train
    title = (f"{cfg.name}: {t.steps} step(s) of SGD, lr {t.lr:g}, layers {t.layers}, kinds {','.join(t.kinds)}, "
             f"loss {t.loss}, {cfg.tint.dtype}, T={length} (first half train)")
    return render(rows, title)
