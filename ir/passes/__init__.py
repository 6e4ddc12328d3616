"""Graph passes. Each is `pass(graph, options) -> PassResult(graph, changed)` and never
mutates its input; `run_passes` names the failing pass and the ones that ran before it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ir.errors import PassError, TintcError

from ..graph import Graph
from ..verify import verify


@dataclass
class PassResult:
    graph: Graph
    changed: bool


def run_passes(graph: Graph, passes: list[tuple[Callable, dict]]) -> Graph:
    """Run (pass, options) pairs in order, verifying the graph after each."""
    done: list[str] = []
    for fn, options in passes:
        try:
            graph = verify(fn(graph, **options).graph)
        except Exception as err:  # noqa: BLE001 - any failure is reported with the pass that raised it
            ran = ", ".join(done) or "none"
            problems = err.problems if isinstance(err, TintcError) else [f"{type(err).__name__}: {err}"]
            raise PassError(problems, headline=f"pass {fn.__name__} failed (passes before it: {ran})") from err
        done.append(fn.__name__)
    return graph
