"""The parameter report of a compiled TinT (DESIGN §2.3 and §5), counted; render.py writes it.

Counting is honest: every tensor the TinT module stores (each parameter and buffer) is
counted dense, as stored (`numel`), and its nonzeros separately (`count_nonzero`).

- **unique**: what the module stores; each shared primitive of `tint.layers` once.
- **unrolled**: every call counts the full size of the primitive it calls (a primitive
  called 40 times counts 40 times): the size of the same TinT without block sharing.
  Breakdowns of it by aux layer, op kind and phase each sum to the total.
- The aux embedding tables (vocab, positions, and the LM head when untied) are inputs of
  the TinT, which reuses them for its own input and output; they are not TinT parameters
  and get their own lines, together with "TinT parameters + embedding tables" (the
  reference code counts token and position embeddings inside its total).
- The prefix tokens are what `encode(θ)` produces for one checkpoint.
- **standard view, dense** (tintc/report/dense_count.py): the same TinT as a plain stack of transformer
  blocks (backends/torch/standard.py), every projection a dense matrix over the stream width
  D_sim, the paper's convention; and the same under the reference code's convention (what it keeps
  in Python outside the stream: stored activations, the evaluation's input, the positions, the sums'
  operands; tintc/report/dense_count.py). The reference code's figures (DESIGN §6) are
  shown only beside the latter, the count made like theirs.

    report = parameter_report(compiled)      # a JSON-able dict
    write_report(report, directory)          # report.json, report.md, report.png (render.py)
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import torch
from torch import nn

from ir.passes.autodiff import rules_of
from tintc.config.schema import PassesSpec, rule_set_name
from tintc.report.dense_count import dense_counts
from tintc.report.reference_counts import like_with_like

OP_KINDS = ("linear", "activation", "attention", "norm", "loss", "residual")
PHASES = ("forward", "backward", "descent", "eval")
OUTSIDE = "outside layers"  # training-graph ops with no aux layer (embeddings, final norm, loss)
STORED_OUTSIDE_CALLS = "stored outside the calls"  # TinT tensors no call reads through a primitive

# DESIGN §6: measured on the reference code (Panigrahi et al.), random weights, real shapes.
# Settings: D_sim 3072, K 256, 12 TinT heads, all 12 layers trained, 1 SGD step.
REFERENCE = {
    "opt": {
        "label": "TinT(OPT-125M)",
        "aux_parameters": 125_239_296,
        "total": 1_669_324_018,  # as the reference counts it
        "aux_weights_stored": 170_655_744,
        "embeddings": 40_183_296,  # token + position tables
        "without_both": 1_458_484_978,
        "width": 3072,
        "per_layer": {"forward": 45_200_000, "backward+descent": 74_800_000},  # rounded in the source
    },
    "gpt2": {
        "label": "TinT(GPT-2)",
        "aux_parameters": 124_439_808,
        "total": 1_476_796_914,
        "aux_weights_stored": 170_655_744,
        "embeddings": 39_383_808,
        "without_both": 1_266_757_362,
        "width": 3072,
        "per_layer": None,
    },
}
REFERENCE_SETTINGS = {"prefixes": 256, "steps": 1, "trained_layers": 12}


# -- counting ----------------------------------------------------------------------------------

def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every tensor a module stores: parameters and buffers, each shared tensor once."""
    seen, out = set(), []
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _size(tensors) -> dict[str, int]:
    dense = nonzero = nbytes = 0
    for t in tensors:
        dense += t.numel()
        nonzero += int(torch.count_nonzero(t.detach()).item()) if t.numel() else 0
        nbytes += t.numel() * t.element_size()
    return {"dense": dense, "nonzero": nonzero, "bytes": nbytes}


def _zero() -> dict[str, int]:
    return {"calls": 0, "dense": 0, "nonzero": 0, "bytes": 0}


def _add(acc: dict, size: dict, calls: int = 1) -> None:
    acc["calls"] += calls
    for k in ("dense", "nonzero", "bytes"):
        acc[k] += size[k] * max(calls, 1)


def _layer_key(layer: int) -> str:
    return OUTSIDE if layer is None or layer < 0 else f"layer {layer}"


def _ordered(d: dict, order) -> dict:
    """Keys in `order` first (those present), then the rest in sorted order."""
    first = [k for k in order if k in d]
    return {k: d[k] for k in first + sorted(k for k in d if k not in first)}


def _ref_numel(ref, shapes) -> int:
    n = 1
    for s in ref.shape(tuple(shapes[ref.name])):
        n *= s
    return n


def changed_passes(passes: dict) -> list[str]:
    """The passes' switches and knobs that differ from the defaults, as `name.key = value` (JSON values)."""
    defaults = PassesSpec().model_dump()
    return [f"{name}.{key} = {json.dumps(value)}" for name, spec in passes.items() for key, value in spec.items()
            if value != defaults[name][key]]


def parameter_report(compiled) -> dict:
    """Counts of the compiled TinT's stored tensors (see the module docstring); a JSON-able dict."""
    tint, graph, train_graph = compiled.tint, compiled.graph, compiled.train_graph
    program = tint.program
    layout = program.layout

    # unique: everything the module stores
    all_tensors = _tensors(tint)
    unique = _size(all_tensors)
    in_layers = {id(t) for m in tint.layers.values() for t in _tensors(m)}
    outside = _size([t for t in all_tensors if id(t) not in in_layers])  # stored, read by no primitive

    sizes = {name: _size(_tensors(m)) for name, m in tint.layers.items()}
    uses = Counter(call.layer for call in program.calls)
    missing = sorted(set(uses) - set(sizes))
    if missing:
        raise ValueError(f"calls use primitives the TinT does not hold: {', '.join(missing)}")

    # unrolled: each call counts the full size of its primitive
    unrolled = _zero()
    by_layer, by_op, by_phase = defaultdict(_zero), defaultdict(_zero), defaultdict(_zero)
    by_phase_op = defaultdict(lambda: defaultdict(_zero))
    by_layer_phase = defaultdict(lambda: defaultdict(_zero))
    prim_ops, prim_phases = defaultdict(Counter), defaultdict(Counter)
    trained_layers = set()
    for call in program.calls:
        size = sizes[call.layer]
        layer = train_graph.node(call.node).attrs.get("layer", -1)
        lk = _layer_key(layer)
        for acc in (unrolled, by_layer[lk], by_op[call.op], by_phase[call.phase],
                    by_phase_op[call.phase][call.op], by_layer_phase[lk][call.phase]):
            _add(acc, size)
        prim_ops[call.layer][call.op] += 1
        prim_phases[call.layer][call.phase] += 1
        if call.phase == "descent" and layer is not None and layer >= 0:
            trained_layers.add(layer)
    if outside["dense"]:  # counted once in the unrolled TinT too, and shown as its own line
        for acc in (unrolled, by_layer[STORED_OUTSIDE_CALLS], by_op[STORED_OUTSIDE_CALLS],
                    by_phase[STORED_OUTSIDE_CALLS]):
            _add(acc, outside, calls=0)

    # unique by op kind (and phase): a primitive called by several kinds is its own "a+b" key
    unique_by_op, unique_by_phase = defaultdict(_zero), defaultdict(_zero)
    for name, size in sizes.items():
        ops = "+".join(sorted(prim_ops[name])) or "unused"
        phases = "+".join(p for p in PHASES if p in prim_phases[name]) or "unused"
        _add(unique_by_op[ops], size, calls=0)
        _add(unique_by_phase[phases], size, calls=0)
        unique_by_op[ops]["primitives"] = unique_by_op[ops].get("primitives", 0) + 1
        unique_by_phase[phases]["primitives"] = unique_by_phase[phases].get("primitives", 0) + 1
    if outside["dense"]:
        _add(unique_by_op[STORED_OUTSIDE_CALLS], outside, calls=0)
        _add(unique_by_phase[STORED_OUTSIDE_CALLS], outside, calls=0)

    # the aux model, its embedding tables, and the prefix tokens
    aux_parameters = compiled.aux_parameters  # tied tensors listed once
    tables = {"vocab": _ref_numel(layout.vocab, layout.shapes)}
    if layout.positions is not None:  # rotary models have no position table
        tables["positions"] = _ref_numel(layout.positions, layout.shapes)
    if not layout.tied:
        tables["unembed"] = _ref_numel(layout.unembed, layout.shapes)
    tables["total"] = sum(tables.values())
    prefix_layers = defaultdict(lambda: {"blocks": 0, "tokens": 0, "numel": 0})
    for block in layout.blocks.values():
        layer = graph.node(block.name).attrs.get("layer", -1) if block.name in graph else -1
        for acc in (prefix_layers[_layer_key(layer)],):
            acc["blocks"] += 1
            acc["tokens"] += block.tokens
            acc["numel"] += block.tokens * block.width
    prefixes = {
        "blocks": len(layout.blocks),
        "tokens": sum(b.tokens for b in layout.blocks.values()),
        "numel": sum(b.tokens * b.width for b in layout.blocks.values()),
        "tokens_per_linear": sorted({b.tokens for b in layout.blocks.values() if b.kind == "linear"}),
    }
    prefixes["encoder_output_numel"] = prefixes["numel"] + tables["total"]  # blocks + the tables passed through

    layer_keys = sorted(by_layer, key=lambda k: (k != OUTSIDE, k == STORED_OUTSIDE_CALLS,
                                                 int(k.split()[1]) if k.startswith("layer ") else -1))
    attrs = graph.attrs
    dtype = next((str(t.dtype).removeprefix("torch.") for t in all_tensors), None)
    report = {
        "name": graph.name,
        "family": attrs.get("family"),
        "aux": {k: attrs.get(k) for k in ("d_model", "n_layer", "n_head", "d_ffn", "vocab", "max_positions")},
        "settings": {
            "steps": train_graph.attrs.get("steps"),
            "lr": train_graph.attrs.get("lr"),
            "prefixes": prefixes["tokens_per_linear"][0] if len(prefixes["tokens_per_linear"]) == 1
            else prefixes["tokens_per_linear"],
            "trained_layers": sorted(trained_layers),
            "tied_embeddings": layout.tied,
            "backward_rules": {"set": rule_set_name(rules_of(train_graph)), **rules_of(train_graph)},
            "passes": compiled.passes,
            "passes_changed": changed_passes(compiled.passes),
        },
        "tint": {
            "width": program.width,
            "max_length": program.max_length,
            "calls": len(program.calls),
            "primitives": len(program.layers),
            "primitives_used": len(uses),
            "dtype": dtype,
        },
        "counts": {
            "unique": unique,
            "unrolled": {k: unrolled[k] for k in ("dense", "nonzero", "bytes")},
            "stored_outside_calls": outside,
            "sharing_factor": unrolled["dense"] / unique["dense"] if unique["dense"] else None,
        },
        "embedding_tables": tables,
        "tint_plus_embedding_tables": {"unrolled": unrolled["dense"] + tables["total"],
                                       "unique": unique["dense"] + tables["total"]},
        "aux_parameters": aux_parameters,
        "prefixes": prefixes,
        "breakdown": {
            "unrolled": {
                "by_layer": {k: by_layer[k] for k in layer_keys},
                "by_op": _ordered(by_op, OP_KINDS),
                "by_phase": _ordered(by_phase, PHASES),
                "by_phase_op": {p: _ordered(by_phase_op[p], OP_KINDS) for p in PHASES if p in by_phase_op},
                "by_layer_phase": {k: _ordered(by_layer_phase[k], PHASES) for k in layer_keys
                                   if k in by_layer_phase},
            },
            "unique": {
                "by_op": _ordered(unique_by_op, OP_KINDS),
                "by_phase": _ordered(unique_by_phase, PHASES),
            },
            "prefixes_by_layer": {k: prefix_layers[k] for k in sorted(
                prefix_layers, key=lambda k: (k != OUTSIDE, int(k.split()[1]) if k.startswith("layer ") else -1))},
        },
        "primitives": sorted(
            ({"name": name, "type": type(tint.layers[name]).__name__, "uses": uses.get(name, 0),
              "dense": size["dense"], "nonzero": size["nonzero"], "unrolled": size["dense"] * uses.get(name, 0),
              "ops": dict(prim_ops[name]), "phases": dict(prim_phases[name])}
             for name, size in sizes.items()),
            key=lambda r: (-r["unrolled"], -r["dense"], r["name"])),
    }
    report["standard_view"] = dense_counts(program, tint.layers)
    report["reference"] = _reference(report)
    report["low_rank"] = program.low_rank  # empty unless tint.passes.low_rank is on
    report["reference_counts"] = like_with_like(report, compiled.aux_config)  # the reference beside ours, like with like
    return report


def _reference(report: dict) -> dict | None:
    """The DESIGN §6 figures when the aux model has the reference's family and shapes (768 wide, 12 layers)."""
    ref = REFERENCE.get(report["family"])
    aux = report["aux"]
    if ref is None or aux.get("d_model") != 768 or aux.get("n_layer") != 12:
        return None
    s = report["settings"]
    ours = {"prefixes": s["prefixes"], "steps": s["steps"], "trained_layers": len(s["trained_layers"])}
    return {**ref, "settings": REFERENCE_SETTINGS,
            "settings_match": all(ours[k] == v for k, v in REFERENCE_SETTINGS.items())}

