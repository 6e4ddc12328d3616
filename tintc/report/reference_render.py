"""Rendering of the report's like-with-like section (tintc/report/reference_counts.py): ours and the
reference code's TinT in three conventions, as a table (report.md, the terminal), a plot panel
(report.png) and the text that explains each convention."""

from __future__ import annotations


CONVENTION_LABELS = {
    "as_stored": "(1) as stored, each side's own structure",
    "dense_activations_outside": "(2) dense over D_sim, activations outside the stream",
    "dense_everything_in_stream": "(3) dense over D_sim, everything in the stream",
}
CONVENTIONS_TEXT = [
    "## The three conventions", "",
    "**(1) As stored.** Every number each side's modules store, a module used several times counted once, "
    "without the aux embeddings and without the aux weights (ours takes them as input prefixes, the "
    "reference stores them as K×D_sim parameters). The two are built differently (our dense primitives "
    "called many times, its block-structured Conv2D maps), so this compares what each program holds, not "
    "the size of a transformer.", "",
    "**(2) Dense, activations outside the stream** (the reference's convention). Every projection is a dense "
    "D_sim×D_sim matrix plus bias over the residual stream, and what the reference keeps in Python travels "
    "outside it: the activations kept for the backward (its Python lists), the evaluation's input, the "
    "one-hot positions (its maps over them are small maps) and the operands of every sum (its Python adds). "
    "Ours is the standard view with those values on skip edges and its sums not counted; the reference's "
    "counts the Conv2D maps a forward pass applies, its position maps and gates as stored.", "",
    "**(3) Dense, everything in the stream.** The same dense count with every value the TinT keeps inside "
    "the stream, so that it is one plain stack of transformer blocks. The reference has no such count: its "
    "blocks read stored activations and per-layer prefixes from Python lists. tint.passes.rematerialise "
    "narrows ours: the backward recomputes each layer's forward from the layer's input, so the stream holds "
    "the layer inputs and one sublayer's activations (and (2) widens: the recomputed values are the backward's).", "",
]


def _n(x) -> str:
    return f"{x:,}"


def _ratio(x) -> str:
    return f"{x:.3g}×" if x is not None else ""


def like_with_like_table(report: dict) -> tuple[str, list[str], list[list[str]]]:
    """Ours and the reference's TinT in the same three conventions; a ratio only between like counts."""
    section = report["reference_counts"]
    rows = []
    for name, label in CONVENTION_LABELS.items():
        c = section["conventions"][name]
        theirs = _n(c["reference"]) if c["reference"] is not None else "—"
        if name == "dense_everything_in_stream" and section["applies"]:
            theirs = "none: its backward reads Python lists"
        rows.append([label, _n(c["tintc"]), theirs, _ratio(c["ratio"])])
        if c["d_sim"]["tintc"] is not None:
            d = c["d_sim"]
            rows.append(["    D_sim", _n(d["tintc"]), _n(d["reference"]) if d["reference"] else "—",
                         _ratio(d["tintc"] / d["reference"]) if d["reference"] else ""])
    if not section["applies"]:
        rows.append(["the reference code", "", "no figures", section["why_not"]])
        return "Like with like: tintc and the reference code's TinT", ["", "tintc", "reference", "note"], rows
    ref, s = section["reference"], section["settings"]
    rows += [
        [f"reference: dense over every stored map ({ref['maps']:,} maps, {ref['maps_applied']:,} applied)", "",
         _n(ref["dense_every_map"]), ""],
        [f"reference: dense, consecutive linear maps composed ({ref['maps_composed']:,} maps)", "",
         _n(ref["dense_composed"]), ""],
        ["reference: per-layer blocks once (1 forward, 1 backward, the gradient module)", "",
         _n(ref["blocks_once"]), ""],
        [f"reference: as its code prints it (+ {ref['prefix_tensors']} aux weight tensors K×D_sim "
         f"{ref['aux_weights_stored']:,}, + embeddings {ref['embeddings']:,})", "", _n(ref["printed"]), ""],
    ]
    title = (f"Like with like: tintc and the reference code's TinT at this shape (D_sim {s['width']:,}, "
             f"K {s['prefixes']}, {s['heads']} TinT heads, {s['trained_layers']} layers trained, "
             f"{s['steps']} step(s), one-hot positions {ref['position_width']:,} wide"
             + (f"; {section['own_k']})" if section.get("own_k") else ")"))
    return title, ["", "tintc", "reference", "tintc / reference"], rows


def like_with_like_panel(ax, report: dict) -> None:
    """report.png: the three conventions side by side, log scale (the reference has no (3))."""
    section = report["reference_counts"]
    names = list(CONVENTION_LABELS)
    xs = range(len(names))
    ours = [section["conventions"][n]["tintc"] for n in names]
    theirs = [section["conventions"][n]["reference"] or 0 for n in names]
    ax.bar([x - 0.2 for x in xs], ours, width=0.4, color="#4C72B0", label="tintc")
    ax.bar([x + 0.2 for x in xs], theirs, width=0.4, color="#DD8452", label="reference code")
    for x, n in zip(xs, names):
        ratio = section["conventions"][n]["ratio"]
        if ratio is not None:
            ax.annotate(_ratio(ratio), (x, max(ours[x], theirs[x])), ha="center", va="bottom", fontsize="small")
        elif section["applies"]:  # no bar on a log scale: say it
            ax.annotate("reference:\nnone", (x + 0.2, ours[x]), ha="center", va="top", fontsize="small")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), ["(1) as stored", "(2) dense,\nacts outside", "(3) dense,\nall in stream"])
    ax.tick_params(axis="x", labelsize="small")
    ax.set_title("like with like" if section["applies"] else "like with like (no reference construction)")
    ax.set_ylabel("parameters (log scale)")
    ax.legend(fontsize="small")
