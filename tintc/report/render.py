"""Rendering the parameter report (tintc/report/counts.py): tables for Markdown and the terminal, a plot,
and the files report.json, report.md and report.png."""

from __future__ import annotations

import json
import re

from tintc.files import write_files
from tintc.report.counts import OP_KINDS, OUTSIDE, PHASES, STORED_OUTSIDE_CALLS
from tintc.report.reference_render import CONVENTIONS_TEXT, like_with_like_panel, like_with_like_table


# -- tables (shared by Markdown and rich) -------------------------------------------------------

def _n(x) -> str:
    return f"{x:,}" if isinstance(x, int) else (f"{x:,.2f}" if isinstance(x, float) else str(x))


def _human(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:g}"


def _pct(part, whole) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "—"


def tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report as (title, columns, rows) tables, for report.md and the terminal."""
    c, tint, emb, pre = report["counts"], report["tint"], report["embedding_tables"], report["prefixes"]
    u, r = c["unique"], c["unrolled"]
    s, aux = report["settings"], report["aux"]
    out = []

    trained = s["trained_layers"]
    out.append(("TinT", ["", "value"], [
        ["aux model", f"{report['family']}{'' if report['name'] == report['family'] else ' ' + report['name']}: d_model {aux['d_model']}, {aux['n_layer']} layers, "
                      f"{aux['n_head']} heads, d_ffn {aux['d_ffn']}, vocab {aux['vocab']}, "
                      f"{aux['max_positions']} positions"],
        ["settings", f"K = {s['prefixes']} prefix tokens per linear map, {s['steps']} SGD step(s), "
                     f"lr {s['lr']}, trained layers {_ranges(trained)}, "
                     f"{'tied' if s['tied_embeddings'] else 'untied'} embeddings; passes: "
                     f"{', '.join(s['passes_changed']) or 'the defaults'}"],
        ["token stream width of the fast executor", _n(tint["width"])],
        ["standard view: D_sim, blocks", f"{_n(report['standard_view']['ours']['d_sim'])}, "
                                         f"{_n(report['standard_view']['blocks'])}"],
        ["max length", _n(tint["max_length"])],
        ["calls (TinT layers)", _n(tint["calls"])],
        ["shared primitives", f"{_n(tint['primitives'])} ({_n(tint['primitives_used'])} called)"],
        ["dtype", str(tint["dtype"])],
    ]))

    rows = [
        ["TinT parameters, unique (stored; shared primitives once)", _n(u["dense"]), _n(u["nonzero"]),
         _pct(u["nonzero"], u["dense"]), _human(u["dense"])],
        ["TinT parameters, unrolled (each call counts its primitive; no block sharing)", _n(r["dense"]),
         _n(r["nonzero"]), _pct(r["nonzero"], r["dense"]), _human(r["dense"])],
    ]
    if c["stored_outside_calls"]["dense"]:
        o = c["stored_outside_calls"]
        rows.append(["  of which stored outside the calls (counted once)", _n(o["dense"]), _n(o["nonzero"]),
                     _pct(o["nonzero"], o["dense"]), _human(o["dense"])])
    for name in ("vocab", "positions", "unembed"):
        if name in emb:
            rows.append([f"aux embedding table: {name} (a TinT input, not a TinT parameter)", _n(emb[name]),
                         "", "", _human(emb[name])])
    rows += [
        ["aux embedding tables, total", _n(emb["total"]), "", "", _human(emb["total"])],
        ["TinT parameters (unrolled) + embedding tables", _n(report["tint_plus_embedding_tables"]["unrolled"]),
         "", "", _human(report["tint_plus_embedding_tables"]["unrolled"])],
        ["TinT parameters (unique) + embedding tables", _n(report["tint_plus_embedding_tables"]["unique"]),
         "", "", _human(report["tint_plus_embedding_tables"]["unique"])],
        ["aux model parameters (tied weights once)", _n(report["aux_parameters"]), "", "",
         _human(report["aux_parameters"])],
        [f"prefix tokens: {_n(pre['tokens'])} tokens in {_n(pre['blocks'])} blocks (numel)", _n(pre["numel"]),
         "", "", _human(pre["numel"])],
        ["encoder output per checkpoint (prefix blocks + embedding tables)", _n(pre["encoder_output_numel"]),
         "", "", _human(pre["encoder_output_numel"])],
    ]
    out.append(("Parameter counts (dense = numel as stored)", ["", "dense", "nonzero", "nonzero %", "≈"], rows))

    out.append(_standard_view_table(report))
    out.append(like_with_like_table(report))
    if report.get("exactness"):
        out.append(exactness_table(report["exactness"]))

    b = report["breakdown"]["unrolled"]
    ops = [o for o in OP_KINDS if o in b["by_op"]] + [o for o in b["by_op"] if o not in OP_KINDS]
    rows = []
    for phase, row in b["by_phase_op"].items():
        t = b["by_phase"][phase]
        rows.append([phase] + [_n(row[o]["dense"]) if o in row else "" for o in ops] +
                    [_n(t["dense"]), _n(t["nonzero"]), _n(t["calls"])])
    if STORED_OUTSIDE_CALLS in b["by_phase"]:
        t = b["by_phase"][STORED_OUTSIDE_CALLS]
        rows.append([STORED_OUTSIDE_CALLS] + ["" for _ in ops] + [_n(t["dense"]), _n(t["nonzero"]), "0"])
    rows.append(["total"] + [_n(b["by_op"][o]["dense"]) for o in ops] + [_n(r["dense"]), _n(r["nonzero"]),
                                                                        _n(tint["calls"])])
    out.append(("Unrolled parameters by phase × op kind (dense)", ["phase"] + ops + ["total", "nonzero", "calls"],
                rows))

    phases = [p for p in PHASES if p in b["by_phase"]]
    rows = []
    prefix_layers = report["breakdown"]["prefixes_by_layer"]
    for key, t in b["by_layer"].items():
        per = b["by_layer_phase"].get(key, {})
        rows.append([key] + [_n(per[p]["dense"]) if p in per else "" for p in phases] +
                    [_n(t["dense"]), _n(t["nonzero"]), _pct(t["dense"], r["dense"]), _n(t["calls"]),
                     _n(prefix_layers.get(key, {}).get("numel", 0))])
    rows.append(["total"] + [_n(b["by_phase"][p]["dense"]) for p in phases] +
                [_n(r["dense"]), _n(r["nonzero"]), "100.0%", _n(tint["calls"]), _n(pre["numel"])])
    out.append(("Unrolled parameters by aux layer (dense; the last column is the layer's prefix numel, an input)",
                ["aux layer"] + phases + ["total", "nonzero", "share", "calls", "prefix numel"], rows))

    ub = report["breakdown"]["unique"]["by_op"]
    rows = [[k, _n(v.get("primitives", 0)), _n(v["dense"]), _n(v["nonzero"]), _pct(v["dense"], u["dense"])]
            for k, v in ub.items()]
    rows.append(["total", _n(tint["primitives"]), _n(u["dense"]), _n(u["nonzero"]), "100.0%"])
    out.append(("Unique parameters by op kind (a primitive called by several kinds is listed under a+b)",
                ["op kind", "primitives", "dense", "nonzero", "share"], rows))

    rows = [[p["name"], p["type"], _n(p["uses"]), _n(p["dense"]), _n(p["nonzero"]), _n(p["unrolled"]),
             ", ".join(f"{k} {v}" for k, v in p["phases"].items())] for p in report["primitives"][:15]]
    out.append((f"Largest primitives by unrolled size (15 of {tint['primitives']})",
                ["primitive", "type", "calls", "dense", "nonzero", "unrolled", "calls by phase"], rows))
    if report.get("low_rank"):
        entries = report["low_rank"]
        done = sum(e["factorised"] for e in entries)
        rows = [[e["layer"], e["weight"], "×".join(map(str, e["shape"])), _n(e["rank"]),
                 "yes" if e["factorised"] else "no",
                 "" if e["factorised"] else f"{e['truncation_error']:.3g}"] for e in entries]
        out.append((f"Low rank: {done} of {len(entries)} projections factorised exactly (the others: the "
                    "relative error a truncation to the chosen rank would make)",
                    ["primitive", "projection", "shape", "rank", "factorised", "truncation error"], rows))
    return out


def _standard_view_table(report: dict) -> tuple[str, list[str], list[list[str]]]:
    """The standard view counted dense (tintc/report/dense_count.py), in our convention and the reference's
    (the reference code's own figures are in the like-with-like table, tintc/report/reference_render.py)."""
    sv = report["standard_view"]
    ours, theirs = sv["ours"], sv["reference_convention"]
    kinds = ", ".join(f"{n} {k}" for k, n in sv["blocks_by_kind"].items())
    heads = sv["heads_per_attention_block"]
    rows = [
        ["blocks", _n(sv["blocks"]), f"{kinds}; {sv['erase_blocks']} only erase dead fields"],
        ["heads per attention block", f"{heads['median']}" if heads else "—",
         f"min {heads['min']}, max {heads['max']}" if heads else ""],
        ["ours: D_sim", _n(ours["d_sim"]), f"token fields {_n(ours['token_fields'])} + prefix rows "
                                           f"{_n(ours['prefix_rows'])}" if not sv.get("shared_rows") else
         f"token fields {_n(ours['token_fields'])}, prefix rows {_n(ours['prefix_rows'])} on them from "
         f"coordinate {_n(ours['rows_at'])} (tint.passes.shared_rows)"],
        ["ours: dense parameters", _n(ours["dense"]["total"]), _human(ours["dense"]["total"])],
        ["ours: dense, projections factored where smaller", _n(ours["dense"]["factored"]),
         _human(ours["dense"]["factored"])],
        ["reference convention: D_sim", _n(theirs["d_sim"]),
         (f"working set {_n(theirs['working_set'])} + prefix rows {_n(theirs['prefix_rows'])}; "
          if not sv.get("shared_rows") else f"working set {_n(theirs['working_set'])}, prefix rows "
          f"{_n(theirs['prefix_rows'])} beside the {_n(theirs['working_set_apart'])} kept apart from them; ") +
         f"{_n(theirs['skip_edges'])} skip edges carry {_n(theirs['skip_edge_width'])} coordinates"],
        ["reference convention: dense parameters", _n(theirs["dense"]["total"]),
         f"{_human(theirs['dense']['total'])}; of which maps over the positions "
         f"{_n(theirs['dense']['position_maps'])}; not counted, the sums (Python adds there) "
         f"{_n(theirs['dense']['python_sums'])}"],
    ]
    rows.append(["reference convention: dense, projections factored where smaller", _n(theirs["dense"]["factored"]),
                 _human(theirs["dense"]["factored"])])
    return ("Standard view, dense (every block's projections as dense matrices over D_sim)",
            ["", "value", "note"], rows)


def exactness_table(result: dict) -> tuple[str, list[str], list[list[str]]]:
    """The cost of exactness (tintc/report/exactness.py): each set of rules, its counts and their ratio to the
    paper's rules (the first row)."""
    base = result["rows"][0]
    timed = result.get("length") is not None

    def cell(row, key, fmt=_n):
        if key not in base or "error" in base:
            return fmt(row[key])
        return f"{fmt(row[key])} ({row[key] / base[key]:.2f}×)"

    seconds = lambda x: f"{x:.3g}"  # noqa: E731
    columns = ["rules", "kinds", "unique stored", "unrolled", "standard view dense", "calls", "blocks"]
    columns += [f"forward s, T={result['length']}"] if timed else []
    rows = []
    for row in result["rows"]:
        dropped = [k for k in result["config_kinds"] if k not in row["kinds"]]
        kinds = "config's" if not dropped else "without " + ", ".join(dropped)
        if "error" in row:
            rows.append([row["name"], kinds, f"no TinT: {row['error']}"] + [""] * (len(columns) - 3))
            continue
        rows.append([row["name"], kinds] + [cell(row, k) for k in ("unique", "unrolled", "standard_view_dense",
                                                                       "calls", "blocks")]
                    + ([cell(row, "forward_seconds", seconds)] if timed else []))
    note = f" (forward: batch 1, median of {result['repeats']} after a warm-up)" if timed else ""
    return ("Cost of exactness: the same config under each backward rule set; × = against the paper's rules"
            + note, columns, rows)


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "none"
    parts, start = [], xs[0]
    for a, b in zip(xs, xs[1:] + [None]):
        if b != a + 1:
            parts.append(str(start) if start == a else f"{start}–{a}")
            start = b
    return ", ".join(parts)


def _numeric_columns(columns, rows) -> list[bool]:
    """Which columns hold numbers (right-aligned): every non-empty cell is a number, a share or a ratio."""
    def numeric(cell: str) -> bool:
        return bool(re.fullmatch(r"[0-9][0-9,.]*( [KMBT])?%?", cell.strip()))
    return [i > 0 and all(numeric(row[i]) for row in rows if row[i].strip() and row[0] != STORED_OUTSIDE_CALLS)
            for i in range(len(columns))]


def to_markdown(report: dict) -> str:
    rules = report["settings"].get("backward_rules", {})
    lines = [f"# Parameter report: {report['name']}", "",
             f"Backward rules: {rules.get('set', '?')} ("
             + ", ".join(f"{k} {v}" for k, v in rules.items() if k != "set") + ").", "",
             "Every tensor the TinT module stores is counted dense, as stored (numel), and its nonzeros "
             "separately. *Unique* counts each shared primitive once (what the module stores); *unrolled* "
             "counts each call's primitive in full (the TinT without block sharing). The aux embedding tables "
             "are TinT inputs, not parameters, and have their own lines.", "",
             "The *standard view* is the same TinT as a plain stack of transformer blocks over one residual "
             "stream of width D_sim (attention, gated MLP or grouped layer norm; each block adds its output). "
             "Its *dense* count takes every projection as a dense matrix over D_sim, heads and all (the "
             "paper's convention). *Ours*: D_sim holds every value the TinT keeps. *Reference convention*: "
             "what the reference code keeps in Python stays out of the stream: values stored from a forward "
             "phase for a later phase travel on skip edges (its Python lists, and its copy of the evaluation's "
             "input), the one-hot positions lie beside it (a projection that reads them is charged a map over "
             "the T positions), and a sum is a Python add (its operands outside the stream, its block not "
             "counted); D_sim is the widest working set, or the values kept apart from the rows plus the "
             "widest row. *Factored*: "
             "each projection that touches k stream coordinates stored as two dense factors [n, k]·[k, D_sim] "
             "where that is smaller (exact; tint.passes.low_rank builds the view so). The reference "
             "code's figures appear in the like-with-like table, each beside the count made like it.", ""]
    for title, columns, rows in tables(report):
        right = _numeric_columns(columns, rows)
        lines += [f"## {title}", "", "| " + " | ".join(columns) + " |",
                  "|" + "|".join("---:" if r else ":---" for r in right) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines + CONVENTIONS_TEXT)


def rich_tables(report: dict):
    """The report as rich Tables for the terminal."""
    from rich.table import Table

    out = []
    for title, columns, rows in tables(report):
        table = Table(title=title, title_justify="left")
        for col, right in zip(columns, _numeric_columns(columns, rows)):
            table.add_column(col, justify="right" if right else "left", overflow="fold")
        for row in rows:
            table.add_row(*row, style="bold" if row[0] == "total" else None)
        out.append(table)
    return out


# -- the plot ----------------------------------------------------------------------------------

_COLOURS = {"linear": "#4C72B0", "activation": "#DD8452", "attention": "#55A868", "norm": "#C44E52",
            "loss": "#8172B3", "residual": "#937860", STORED_OUTSIDE_CALLS: "#999999",
            "forward": "#4C72B0", "backward": "#DD8452", "descent": "#C44E52", "eval": "#55A868"}


def plot(report: dict, path) -> None:
    """report.png: unrolled parameters by phase × op kind, by aux layer × phase, and the totals."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    b = report["breakdown"]["unrolled"]
    c = report["counts"]
    scale, unit = _unit(max(c["unrolled"]["dense"], report["tint_plus_embedding_tables"]["unrolled"], 1))
    fig = Figure(figsize=(21, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2, ax3, ax4 = fig.subplots(1, 4, width_ratios=[1, 1.5, 1.25, 1.25])
    like_with_like_panel(ax4, report)
    fig.suptitle(f"TinT parameters: {report['name']} ({report['family']}, width {report['tint']['width']:,}, "
                 f"{report['tint']['calls']:,} calls of {report['tint']['primitives']:,} shared primitives)")

    phases = list(b["by_phase_op"])
    ops = [o for o in OP_KINDS if o in b["by_op"]] + [o for o in b["by_op"] if o not in OP_KINDS
                                                        and o != STORED_OUTSIDE_CALLS]
    bottom = [0.0] * len(phases)
    for op in ops:
        vals = [b["by_phase_op"][p].get(op, {"dense": 0})["dense"] / scale for p in phases]
        ax1.bar(phases, vals, bottom=bottom, label=op, color=_COLOURS.get(op))
        bottom = [x + v for x, v in zip(bottom, vals)]
    ax1.set_title("unrolled, by phase × op kind")
    ax1.set_ylabel(f"parameters ({unit})")
    ax1.legend(fontsize="small", ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.07))

    layer_scale, layer_unit = _unit(max((v["dense"] for v in b["by_layer"].values()), default=1))
    keys = list(b["by_layer_phase"])
    labels = ["outside" if k == OUTSIDE else k.removeprefix("layer ") for k in keys]
    bottom = [0.0] * len(keys)
    for phase in PHASES:
        vals = [b["by_layer_phase"][k].get(phase, {"dense": 0})["dense"] / layer_scale for k in keys]
        if any(vals):
            ax2.bar(labels, vals, bottom=bottom, label=phase, color=_COLOURS.get(phase))
            bottom = [x + v for x, v in zip(bottom, vals)]
    ax2.set_title("unrolled, by aux layer × phase")
    ax2.set_xlabel("aux layer")
    ax2.set_ylabel(f"parameters ({layer_unit})")
    ax2.legend(fontsize="small", ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.12))

    bars = [("unique", c["unique"]["dense"], c["unique"]["nonzero"]),
            ("unrolled", c["unrolled"]["dense"], c["unrolled"]["nonzero"]),
            ("unrolled\n+ emb.", report["tint_plus_embedding_tables"]["unrolled"], None)]
    names = [n for n, _, _ in bars]
    ax3.bar(names, [v / scale for _, v, _ in bars], color="#BBBBBB", label="dense")
    ax3.bar(names, [(nz or 0) / scale for _, _, nz in bars], color="#4C72B0", label="nonzero")
    for i, (_, v, nz) in enumerate(bars):
        text = _human(v) + ("" if nz is None else f"\n{_human(nz)} nz")
        ax3.annotate(text, (i, v / scale), ha="center", va="bottom", fontsize="small")
    ax3.margins(y=0.12)
    ax3.set_title("stored totals")
    ax3.set_ylabel(f"parameters ({unit})")
    ax3.tick_params(axis="x", labelsize="small")
    ax3.legend(fontsize="small")
    fig.savefig(str(path), dpi=110, format="png")  # the path may be a temporary name


def _unit(x: float) -> tuple[float, str]:
    for unit, scale in (("billions", 1e9), ("millions", 1e6), ("thousands", 1e3)):
        if x >= scale:
            return scale, unit
    return 1.0, "count"


# -- writing -----------------------------------------------------------------------------------

def report_files(report: dict) -> dict:
    """report.json, report.md and report.png, for tintc.files.write_files."""
    return {
        "report.json": json.dumps(report, indent=2) + "\n",
        "report.md": to_markdown(report),
        "report.png": lambda path: plot(report, path),
    }


def write_report(report: dict, directory, force: bool = False, source: str | None = None) -> list[str]:
    """Write report.json, report.md and report.png under `directory`; return their paths."""
    return [str(p) for p in write_files(directory, report_files(report), force=force, source=source)]
