"""The cost of exactness: what each exact backward rule costs against the paper's approximation.

The same config is compiled once per set of rules, on the same model and shapes: the paper's rules
(stop-gradient attention, finite-difference norm and activation backward), each rule made exact
alone, and every rule exact. Each TinT is measured as the parameter report measures a compile:
parameters stored (unique: shared primitives once), unrolled (each call its primitive), the
standard view counted dense over D_sim (our convention, tintc/report/dense_count.py), calls and
standard-view blocks, and, when asked, the forward time at one input length (in this process,
batch 1, the first half train, median of `repeats` runs after a warm-up).

Kinds: the config's in every row, except that attn_q and attn_k are dropped where attention is
stop_gradient (they get no gradient there; the config refuses them): so an exact-attention row
also carries the cost of training W_Q and W_K when the config trains them. A rule without a
construction for this model gives a row with its error.
"""

from __future__ import annotations

import statistics
import time

import torch

from tintc.config import TintcConfig
from tintc.config.schema import RULE_SETS
from ir.errors import TintcError

RULES = ("attention", "layer_norm", "activation")
APPROXIMATE, EXACT_ALL = RULE_SETS["paper"], RULE_SETS["exact"]
VARIANTS = [("paper rules", {})] + [(f"{rule} exact", {rule: "exact"}) for rule in RULES] + [("all exact", EXACT_ALL)]


def variant(cfg: TintcConfig, exact: dict) -> TintcConfig:
    """`cfg` with the paper's rules except those in `exact`, and the kinds those rules can train."""
    return cfg.with_rules({**APPROXIMATE, **exact})


def costs(compiled) -> dict:
    """The counts of one compiled TinT, made as tintc/report/counts.py makes them."""
    from tintc.report.dense_count import dense_counts
    from tintc.report.counts import _tensors

    tint = compiled.tint
    program = tint.program
    sizes = {name: sum(t.numel() for t in _tensors(m)) for name, m in tint.layers.items()}
    in_layers = {id(t) for m in tint.layers.values() for t in _tensors(m)}
    outside = sum(t.numel() for t in _tensors(tint) if id(t) not in in_layers)  # counted once, as the report does
    view = dense_counts(program, tint.layers)
    return {"unique": sum(t.numel() for t in _tensors(tint)),
            "unrolled": sum(sizes[call.layer] for call in program.calls) + outside,
            "standard_view_dense": view["ours"]["dense"]["total"], "standard_view_d_sim": view["ours"]["d_sim"],
            "blocks": view["blocks"], "calls": len(program.calls), "width": program.width}


def forward_seconds(compiled, length: int, repeats: int) -> float:
    """Median time of one TinT forward on `length` tokens (batch 1, the first half train)."""
    from tintc.oracle.fidelity import example_input

    tint = compiled.tint
    ids, train, labels = example_input(compiled.graph.attrs["vocab"], length, 1, seed=0)
    labels = labels if tint.label_only else None
    prefixes = tint.encode({n: p.detach() for n, p in compiled.model.named_parameters()})
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):  # the first is the warm-up
            start = time.perf_counter()
            tint(ids, train, prefixes, labels)
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def cost_of_exactness(cfg: TintcConfig, model=None, length: int | None = None, repeats: int = 3,
                      progress=lambda message: None) -> dict:
    """One row per set of rules (VARIANTS): its rules, kinds and costs (or its error); with `length`,
    also the forward time at min(length, the TinT's max length)."""
    from tintc import pipeline

    rows, timed_length = [], None
    for name, exact in VARIANTS:
        progress(f"cost of exactness: {name}")
        one = variant(cfg, exact)
        row = {"name": name, "rules": {rule: one.tint.approximations.model_dump()[rule] for rule in RULES},
               "kinds": list(one.tint.train.kinds)}
        try:
            if not row["kinds"]:
                raise TintcError("no kind left to train: the config trains only attn_q, attn_k")
            compiled = pipeline.compile_tint(one, model)
        except TintcError as error:
            rows.append({**row, "error": "; ".join(error.problems)})
            continue
        row.update(costs(compiled), compile_seconds=compiled.seconds)
        if length is not None:
            timed_length = min(length, compiled.tint.program.max_length)
            model = compiled.model  # the aux weights for the prefixes: read at the first timing, then kept
            row["forward_seconds"] = forward_seconds(compiled, timed_length, repeats)
        del compiled
        rows.append(row)
    return {"rows": rows, "config_kinds": list(cfg.tint.train.kinds), "length": timed_length, "repeats": repeats if length is not None else None,
            "threads": torch.get_num_threads()}
