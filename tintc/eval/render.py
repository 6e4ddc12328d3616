"""The outputs of `tintc eval`: a rich table, eval.json (every per-chunk value), eval.md and
eval.png (perplexity against the learning rate, one line per row, base as a horizontal line)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from tintc.eval.run import BASE, EXACT, ChunkValues, EvalResult
from tintc.files import write_files
from tintc.options import lr_name

COLUMNS = ("lr", "row", "perplexity", "change from base", "share of the exact gain", "s / chunk", "tokens / s",
           "worst chunk |ppl/ppl(reference) − 1|")


def summary_rows(result: EvalResult) -> list[list[str]]:
    """One line per (lr, row), base first: the cells of COLUMNS."""
    base = result.perplexity(result.base)
    lines = [["—", BASE, f"{base:.4f}", "—", "—", *_speed(result, result.base), "—"]]
    for lr, rows in result.runs.items():
        for row in rows:
            ppl = result.perplexity(rows[row])
            reference = result.references.get(row)
            worst = f"{worst_vs_reference(result, lr, row):.2e} vs {reference}" if reference else "—"
            lines.append([lr_name(lr), row, f"{ppl:.4f}", f"{ppl - base:+.4f} ({100 * (ppl / base - 1):+.2f}%)",
                          _share(result, lr, row), *_speed(result, rows[row]), worst])
    return lines


def share_of_exact_gain(result: EvalResult, lr: float, row: str) -> float | None:
    """(ppl(base) − ppl(row)) / (ppl(base) − ppl(exact dynamic eval)): how much of exact dynamic
    evaluation's gain the row keeps; None where exact dynamic evaluation gains nothing."""
    base, exact = result.perplexity(result.base), result.perplexity(result.runs[lr][EXACT])
    return None if base == exact else (base - result.perplexity(result.runs[lr][row])) / (base - exact)


def _share(result: EvalResult, lr: float, row: str) -> str:
    share = share_of_exact_gain(result, lr, row)
    return "—" if share is None else f"{100 * share:.1f}%"


def _speed(result: EvalResult, values: list[ChunkValues]) -> list[str]:
    """Seconds per chunk and tokens per second (T tokens per chunk)."""
    seconds = _mean_seconds(values)
    return [f"{seconds:.3f}", f"{result.info['length'] / seconds:,.0f}" if seconds > 0 else "—"]


def worst_vs_reference(result: EvalResult, lr: float, row: str) -> float:
    """The largest per-chunk relative perplexity difference between `row` and its reference row at `lr`
    (result.references): for a TinT, its ĝ (the construction error) or, with exact rules, exact dynamic
    evaluation; for ĝ in float64, ĝ (float32 rounding alone, the floor)."""
    ours = result.chunk_perplexities(result.runs[lr][row])
    reference = result.chunk_perplexities(result.runs[lr][result.references[row]])
    return max(abs(t / g - 1) for t, g in zip(ours, reference))


def _mean_seconds(values: list[ChunkValues]) -> float:
    return sum(v.seconds for v in values) / len(values)


def title(result: EvalResult) -> str:
    i = result.info
    return (f"{i['config']}: {len(result.starts)} chunks of T={i['length']} ({i['train_tokens']} train, "
            f"{result.predictions} test predictions each), {i['steps']} SGD step(s), {i['dtype']}, rules "
            f"{' and '.join(i['rule_sets'])}, batch {i.get('batch', 1)}, {i['processes']} process(es) on {i['device']}")


def rule_notes(info: dict) -> list[str]:
    """One line per rule set that ran: its backward rules and the kinds it trains."""
    return [f"rules {name}: " + ", ".join(f"{k} {v}" for k, v in rules.items() if k != "kinds")
            + f"; kinds {' '.join(rules['kinds'])}" for name, rules in info["rule_sets"].items()]


def notes(result: EvalResult) -> list[str]:
    i = result.info
    return [f"text: {i['text']}", f"tokens: {i['tokens']:,} ({i['tokenizer']})",
            f"trained: layers {i['layers']}; {EXACT}: kinds {' '.join(i['kinds'])}"] + rule_notes(i) + [
            "the TinT takes η as an input: one compile per rule set serves every learning rate ("
            + ", ".join(f"{name}: {s:.1f} s" for name, s in result.compile_seconds.items()) + ")"] + (
        ["ĝ in float64: its difference from ĝ is float32 rounding alone, the floor for the TinT's"]
        if any(row.endswith("float64)") for rows in result.runs.values() for row in rows) else [])


def table_of(title: str, columns: tuple[str, ...], rows: list) -> Table:
    """The terminal table of an eval (lm or classify): one line per row and learning rate."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column == "row" else "right")
    for line in rows:
        table.add_row(*line)
    return table


def markdown_of(heading: str, notes: list[str], columns: tuple[str, ...], rows: list, explained: str,
                plot: str) -> str:
    """eval.md of an eval (lm or classify): the notes, the table, what its numbers mean, the plot."""
    lines = [f"# {heading}", ""] + [f"- {note}" for note in notes] + [""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    lines += ["", explained, "", f"![{plot}](eval.png)", ""]
    return "\n".join(lines)


def rich_table(result: EvalResult) -> Table:
    return table_of(title(result), COLUMNS, summary_rows(result))


def markdown(result: EvalResult) -> str:
    return markdown_of(f"tintc eval: {title(result)}", notes(result), COLUMNS, summary_rows(result),
                       "Perplexity: exp of the mean next-token CE over the test predictions of every chunk. "
                       "Share of the exact gain: (ppl(base) − ppl(row)) / (ppl(base) − ppl(dynamic eval (exact))). "
                       "The last column is the largest per-chunk |ppl(row) / ppl(reference) − 1|: for a TinT "
                       "against its ĝ, the construction error; with exact rules, against exact dynamic "
                       "evaluation.", "perplexity against learning rate")


def to_json(result: EvalResult) -> dict:
    def values(vs: list[ChunkValues]) -> dict:
        return {"perplexity": result.perplexity(vs), "chunk_perplexity": result.chunk_perplexities(vs),
                "chunk_ce_sum": [v.ce for v in vs], "chunk_seconds": [v.seconds for v in vs]}

    return {
        "info": result.info, "chunk_starts": result.starts, "test_predictions_per_chunk": result.predictions,
        "compile_seconds": result.compile_seconds,
        "base": values(result.base),
        "runs": [{"lr": lr, "rows": {row: values(rows[row]) for row in rows},
                  "share_of_exact_gain": {row: share_of_exact_gain(result, lr, row) for row in rows},
                  "worst_chunk_vs_reference": {
                      row: {"reference": reference, "value": worst_vs_reference(result, lr, row)}
                      for row, reference in result.references.items() if row in rows}}
                 for lr, rows in result.runs.items()],
    }


def plot_against_lr(runs: dict, metric, baselines: list[tuple], ylabel: str, title: str, path: Path,
                    ylim: tuple | None = None) -> None:
    """eval.png of an eval (lm or classify): `metric` of each row against the learning rate, log scale,
    with horizontal `baselines` (value, color, linestyle, label)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    lrs = sorted(runs)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for value, color, linestyle, label in baselines:
        ax.axhline(value, color=color, linestyle=linestyle, label=label)
    for row, style in zip(runs[lrs[0]], ("o-", "s--", "x:", "d-.", "^-", "v--", "+:")):
        ax.plot(lrs, [metric(runs[lr][row]) for lr in lrs], style, label=row)
    ax.set_xscale("log")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel("learning rate η")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120, metadata={"Software": None})  # no version stamp: same bytes
    plt.close(fig)


def plot(result: EvalResult, path: Path) -> None:
    title = f"{result.info['config']}: T={result.info['length']}, {len(result.starts)} chunks"
    plot_against_lr(result.runs, result.perplexity, [(result.perplexity(result.base), "gray", "--", BASE)],
                    "test perplexity", title, path)


def write(result: EvalResult, directory: Path) -> list[Path]:
    return write_files(directory, {
        "eval.json": json.dumps(to_json(result), indent=2, ensure_ascii=False, allow_nan=False) + "\n",
        "eval.md": markdown(result),
        "eval.png": lambda path: plot(result, path),
    })
