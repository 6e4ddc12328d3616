"""The outputs of `tintc eval --task classify`: a rich table, eval.json (every per-example value),
eval.md and eval.png (accuracy against the learning rate, one line per row, the base rows as
horizontal lines)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from tintc.eval.classify import ZERO_SHOT, ClassifyResult, Scores
from tintc.eval.render import markdown_of, plot_against_lr, table_of
from tintc.eval.run import BASE, G_HAT, G_HAT64, TINT
from tintc.files import write_files
from tintc.options import lr_name

COLUMNS = ("lr", "row", "shots", "accuracy", "change from base", "s / example", "worst |label logit − ĝ's|")
COMPARED = (TINT, G_HAT64)  # the rows measured against ĝ example by example


def summary_rows(result: ClassifyResult) -> list[list[str]]:
    """One line per (lr, row), the base rows first: the cells of COLUMNS."""
    k, base = result.info["shots"], result.accuracy(result.base)
    zero = result.accuracy(result.zero_shot)
    lines = [["—", ZERO_SHOT, "0", f"{zero:.4f}", f"{zero - base:+.4f}", f"{_mean_seconds(result.zero_shot):.3f}", "—"],
             ["—", BASE, str(k), f"{base:.4f}", "—", f"{_mean_seconds(result.base):.3f}", "—"]]
    for lr, rows in result.runs.items():
        for row in rows:
            accuracy = result.accuracy(rows[row])
            worst = f"{worst_vs_g_hat(result, lr, row):.2e}" if row in COMPARED else "—"
            lines.append([lr_name(lr), row, str(k), f"{accuracy:.4f}", f"{accuracy - base:+.4f}",
                          f"{_mean_seconds(rows[row]):.3f}", worst])
    return lines


def worst_vs_g_hat(result: ClassifyResult, lr: float, row: str = TINT) -> float:
    """The largest |label-word logit of `row` − ĝ's| over every example and label word at `lr`."""
    return max(abs(a - b) for ours, g_hat in zip(result.runs[lr][row], result.runs[lr][G_HAT])
               for a, b in zip(ours.logits, g_hat.logits))


def _mean_seconds(values: list[Scores]) -> float:
    return sum(v.seconds for v in values) / len(values)


def title(result: ClassifyResult) -> str:
    i = result.info
    return (f"{i['config']}: {len(result.tests)} test examples, {i['shots']}-shot, {len(i['labels'])} labels, "
            f"{i['steps']} SGD step(s) on the label words, {i['dtype']}, {i['processes']} process(es) on {i['device']}")


def notes(result: ClassifyResult) -> list[str]:
    i = result.info
    words = ", ".join(f"{label['value']!r} → {label['word']!r} (token {label['token']})" for label in i["labels"])
    return [f"data: {i['data']} ({i['examples']} examples; demonstrations drawn with seed {i['seed']})",
            f"tokens: {i['tokenizer']}; inputs of {min(i['lengths'])} to {max(i['lengths'])} tokens",
            f"template: {i['template']!r}, separator {i['separator']!r}; label words: {words}",
            f"trained: layers {i['layers']}, kinds {' '.join(i['kinds'])}; backward rules "
            + ", ".join(f"{k} {v}" for k, v in i["approximations"].items()),
            f"the TinT takes η as an input: one compile ({result.compile_seconds:.1f} s) serves every learning rate"]


def rich_table(result: ClassifyResult) -> Table:
    return table_of(title(result), COLUMNS, summary_rows(result))


def markdown(result: ClassifyResult) -> str:
    return markdown_of(f"tintc eval --task classify: {title(result)}", notes(result), COLUMNS, summary_rows(result),
                       "Accuracy: the share of test examples whose label word has the largest next-token logit at "
                       "the query's end. Change from base: against the base model with the same k demonstrations in "
                       "context. The last column is the largest difference from ĝ over every label-word logit of "
                       "every example: for the TinT, the construction error.", "accuracy against learning rate")


def to_json(result: ClassifyResult) -> dict:
    def values(scores: list[Scores]) -> dict:
        return {"accuracy": result.accuracy(scores), "predictions": [s.prediction for s in scores],
                "label_logits": [s.logits for s in scores], "seconds": [s.seconds for s in scores]}

    return {
        "info": result.info, "test_lines": result.tests, "gold": result.gold,
        "demonstration_lines": result.demonstrations,
        "compile_seconds": result.compile_seconds,
        "zero_shot": values(result.zero_shot), "base": values(result.base),
        "runs": [{"lr": lr, "rows": {row: values(rows[row]) for row in rows},
                  "worst_vs_g_hat": {row: worst_vs_g_hat(result, lr, row) for row in COMPARED if row in rows}}
                 for lr, rows in result.runs.items()],
    }


def plot(result: ClassifyResult, path: Path) -> None:
    shots = result.info["shots"]
    baselines = [(result.accuracy(result.zero_shot), "silver", ":", ZERO_SHOT),
                 (result.accuracy(result.base), "gray", "--", f"{BASE} ({shots}-shot)")]
    plot_against_lr(result.runs, result.accuracy, baselines, "accuracy",
                    f"{result.info['config']}: {len(result.tests)} examples, {shots}-shot", path, ylim=(-0.02, 1.02))


def write(result: ClassifyResult, directory: Path) -> list[Path]:
    return write_files(directory, {
        "eval.json": json.dumps(to_json(result), indent=2, ensure_ascii=False, allow_nan=False) + "\n",
        "eval.md": markdown(result),
        "eval.png": lambda path: plot(result, path),
    })
