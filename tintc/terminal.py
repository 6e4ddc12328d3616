"""What the `tintc` commands print on the terminal: the two consoles, the tables that are not part of a
report (op counts, verification errors), the line that sums up a compile, and eval's progress bar."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from ir.passes.autodiff import rules_of
from tintc.config.schema import rule_set_name

# Piped output (CI logs, files) gets room for wide tables instead of rich's default 80 columns.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


def op_count_table(counts: dict[str, int], stage: str) -> Table:
    """`tintc inspect`: the IR ops by kind, and their total."""
    table = Table(title=f"ops at stage {stage}")
    table.add_column("op")
    table.add_column("count", justify="right")
    for kind, count in sorted(counts.items()):
        table.add_row(kind, str(count))
    table.add_row("total", str(sum(counts.values())), style="bold")
    return table


def compiled_line(compiled) -> str:
    """One line on a compile (a pipeline.Compiled): time, calls, primitives, width, unique parameters, rules."""
    program = compiled.tint.program
    unique = sum(p.numel() for p in compiled.tint.parameters())
    return (f"compiled in {compiled.seconds:.2f} s: {len(program.calls)} TinT layer calls of "
            f"{len(program.layers)} shared primitives, width {program.width}, max length {program.max_length}, "
            f"{unique:,} unique parameters, backward rules {rule_set_name(rules_of(compiled.train_graph))}")


def verification_table(cfg, result) -> Table:
    """`tintc verify`: the two errors of DESIGN §1 (a pipeline.Verification), and below float64 the floor."""
    table = Table(title=f"{cfg.name}: T={result.input_shape[1]}, batch {result.input_shape[0]}, {cfg.tint.dtype}, "
                        f"lr {result.lr:g}, rules {cfg.tint.approximations.rule_set}, "
                        f"TinT forward {result.tint_seconds:.2f} s")
    for column in ("error", "‖logits−ref‖/‖ref‖", "‖Δ−Δref‖/‖Δref‖", "cos(Δ,Δref)", "max|logits−ref|",
                   "worst update rel err"):
        table.add_column(column, justify="left" if column == "error" else "right")
    rows = [("construction: TinT vs ĝ oracle", result.construction)]
    if result.rounding is not None:
        dtype = cfg.tint.dtype
        rows += [(f"  TinT ({dtype}) vs ĝ in float64", result.construction_vs_float64),
                 (f"  the {dtype} floor: ĝ ({dtype}) vs ĝ in float64", result.rounding)]
    rows.append(("approximation: ĝ vs exact GD", result.approximation))
    for name, e in rows:
        table.add_row(name, f"{e['logits_rel']:.3e}", f"{e['delta_rel_err']:.3e}", f"{e['delta_cosine']:.9f}",
                      f"{e['logits_max_abs']:.3e}", f"{e['worst_update_rel']:.3e}")
    return table


class progress:
    """A rich progress bar with ETA on stderr (rank 0 only); yields advance(steps, total, what)."""

    def __init__(self, show: bool):
        self.show = show

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if not self.show:
            return lambda advance, total, what: None
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("ETA"), TimeRemainingColumn(), console=err, transient=True)
        self.bar.start()
        task = self.bar.add_task("eval", total=None)

        def advance(steps: int, total: int, what: str) -> None:
            self.bar.update(task, advance=steps, total=total, description=what)

        return advance

    def __exit__(self, *exc) -> None:
        if self.show:
            self.bar.stop()
