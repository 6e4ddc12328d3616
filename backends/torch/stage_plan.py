"""Pipeline stages of a TinT's program: which calls each stage runs, and what crosses each cut.

A stage runs calls [start, stop). At the cut before call b the next stage needs every value that a
call at or after b (or the output head) still reads, and that it cannot make itself:

    tokens   the token-stream coordinates live at b (liveness.live_backwards) that some call before
             b wrote; the input layer's own fields are rebuilt by every stage (runtime.begin)
    blocks   the prefix-block versions made before b and read (or copied into the next version,
             or returned as the new prefixes) at or after b; version 0 comes from the prefixes,
             which every stage is given

Cuts balance an estimated cost (call_cost) and, among the calls near each balanced point, take the
one where the fewest bytes cross. Tintc/eval/stages.py runs the plan on ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ir.errors import BackendError

from .calls import runs_of
from .liveness import NEVER, Accesses, live_backwards
from .primitives import Attention, projections
from .program import TOKENS, Program
from .stream_io import stream_block

MOVED = 4.0  # cost of one stream element gathered or written, in multiply-adds (memory-bound work)
SLACK = 0.1  # a cut may move this share of one stage's cost away from the balanced point to cross less


@dataclass(frozen=True)
class Cut:
    """What the stage before call `at` hands the stage from `at` on."""
    at: int
    tokens: tuple[tuple[int, int], ...]  # (start, size) runs of token-stream coordinates
    blocks: tuple[str, ...]  # prefix-block streams ("block@version")
    elements: int  # per sequence: len(tokens' coordinates) × T + the blocks' K × width


@dataclass(frozen=True)
class Stage:
    start: int
    stop: int  # calls [start, stop)
    cost: float  # call_cost summed
    receives: Cut | None  # None: the first stage
    sends: Cut | None  # None: the last stage (it runs the output head)


def accesses(program: Program) -> list:
    """Per call, the token fields read and written (a read of the whole stream reads every field)."""
    out = []
    for call in program.calls:
        read, written = call.token_fields()
        if any(r.stream == TOKENS and not r.groups for r in call.reads):
            read = [(0, program.width)]
        out.append((read, written))
    return out


def end_reads(program: Program) -> list[tuple[int, int]]:
    """What the output head reads of the token stream."""
    return [(program.logits.start, program.logits.width)]


def rows(program: Program, stream: str, length: int) -> int:
    """Rows of a stream per sequence: T for tokens, V for the unembedding, K for a prefix block."""
    if stream == TOKENS:
        return length
    if stream == "unembed":  # the output embedding's rows: the vocabulary
        ref = program.layout.unembed or program.layout.vocab
        return program.layout.shapes[ref.name][1 if ref.transpose else 0]
    return program.layout.blocks[stream_block(stream)[0]].tokens


def call_cost(program: Program, index: int, length: int) -> float:
    """Estimated work of one call per sequence: the multiply-adds of its projections (and, for
    attention, of the scores and the weighted sum) plus MOVED per element gathered or written."""
    call = program.calls[index]
    layer = program.layers[call.layer]
    groups = max([len(r.groups) for r in call.reads] + [len(call.write.groups), 1])
    read_rows = [rows(program, r.stream, length) for r in call.reads]
    moved = sum(n * sum(f.width for g in r.groups for f in g) for n, r in zip(read_rows, call.reads))
    moved += rows(program, call.write.stream, length) * sum(f.width for f in call.write.groups)
    weights = list(projections(layer).values())
    if isinstance(layer, Attention):  # w_q, w_o on the queries' rows, w_k, w_v on the keys'
        q, k = read_rows[0], read_rows[1]
        macs = sum(p.count() * n for p, n in zip(weights, (q, k, k, q)))
        macs += q * k * (weights[0].shape[0] + weights[2].shape[0])
    else:
        macs = sum(p.count() for p in weights if p is not None) * read_rows[0]
    return float(groups * macs + MOVED * moved)


def block_last_use(program: Program) -> dict[str, int]:
    """Per prefix-block stream, the last call that reads it or copies it into the next version
    (len(calls): the output head returns it)."""
    last = {}
    for i, call in enumerate(program.calls):
        for stream in [r.stream for r in call.reads] + [call.write.base]:
            if stream is not None and stream not in (TOKENS, "unembed"):
                last[stream] = i
    for stream in program.final_blocks.values():
        last[stream] = len(program.calls)
    return last


def block_made(program: Program) -> dict[str, int]:
    """Per prefix-block stream after version 0, the call that makes it."""
    return {c.write.stream: i for i, c in enumerate(program.calls) if c.write.stream != TOKENS}


def first_call_write(program: Program) -> torch.Tensor:
    """Per token coordinate, the first call that writes it (len(calls): none; the input layer is not a call)."""
    tracker = Accesses(program.width, [])
    for i, (_, written) in enumerate(accesses(program)):
        tracker.write(i, written)
    return tracker.first_write.masked_fill(tracker.first_write == NEVER, len(program.calls))


def crossing_blocks(program: Program) -> list[tuple[str, ...]]:
    """Per cut b (0..len(calls)), the prefix-block streams made before call b and still used at or after it."""
    last, spans = block_last_use(program), [[] for _ in range(len(program.calls) + 1)]
    for stream, made in block_made(program).items():
        for b in range(made + 1, last.get(stream, made) + 1):
            spans[b].append(stream)
    return [tuple(streams) for streams in spans]


def block_elements(program: Program, streams) -> int:
    return sum(b.tokens * b.width for b in (program.layout.blocks[stream_block(s)[0]] for s in streams))


def crossing_elements(program: Program, length: int) -> list[int]:
    """Per cut b (0..len(calls)), the elements that cross it per sequence."""
    written, blocks = first_call_write(program), crossing_blocks(program)
    elements = [0] * (len(program.calls) + 1)
    for b, live in live_backwards(program.width, accesses(program), end_reads(program)):
        elements[b] = int((live & (written < b)).sum()) * length + block_elements(program, blocks[b])
    return elements


def cut(program: Program, at: int, length: int) -> Cut:
    """What crosses the cut before call `at`."""
    written = first_call_write(program)
    for b, live in live_backwards(program.width, accesses(program), end_reads(program)):
        if b == at:
            coordinates = torch.nonzero(live & (written < b)).flatten().tolist()
            blocks = crossing_blocks(program)[at]
            return Cut(at, runs_of(coordinates), blocks, len(coordinates) * length + block_elements(program, blocks))
    raise BackendError(f"stage cut at call {at}: the program has {len(program.calls)} calls")


def plan(program: Program, stages: int, length: int) -> list[Stage]:
    """`stages` stages of about equal estimated cost for inputs of `length` tokens; each cut is, of the
    calls within SLACK of a stage's cost from its balanced point, the one where the fewest elements cross."""
    n = len(program.calls)
    if not 1 <= stages <= n:
        raise BackendError(f"stages: got {stages}; allowed: 1 to the program's {n} calls")
    costs = [call_cost(program, i, length) for i in range(n)]
    before = [0.0]  # cost of calls [0, b)
    for c in costs:
        before.append(before[-1] + c)
    share = before[-1] / stages
    elements = crossing_elements(program, length) if stages > 1 else []
    cuts = [0]
    for k in range(1, stages):
        target = k * share
        near = [b for b in range(cuts[-1] + 1, n - (stages - k) + 1) if abs(before[b] - target) <= SLACK * share]
        if not near:  # one call costs more than the slack: the cut nearest the balanced point
            near = [min(range(cuts[-1] + 1, n - (stages - k) + 1), key=lambda b: abs(before[b] - target))]
        cuts.append(min(near, key=lambda b: (elements[b], abs(before[b] - target))))
    cuts.append(n)
    crossings = [None] + [cut(program, b, length) for b in cuts[1:-1]] + [None]
    return [Stage(cuts[k], cuts[k + 1], before[cuts[k + 1]] - before[cuts[k]], crossings[k], crossings[k + 1])
            for k in range(stages)]
