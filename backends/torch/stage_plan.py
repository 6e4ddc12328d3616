"""Pipeline stages of a TinT's program: which stage runs each call, and what it hands to which.

A TinT runs the aux model three times in one program: the forward (layer 0 up), the backward with
the descents (top layer down), the evaluation (layer 0 up again). Stages follow the aux layers, as a
pipeline of the aux model would: each prefix block (one aux weight) belongs to one stage, blocks in
the order the program first uses them, cut into stages of about equal estimated cost (call_cost);
a call belongs to the stage of the block it reads or writes, else to the previous call's stage.
So a stage holds its layers' prefix blocks and their new versions, the activations the backward
saves never leave it, and the program visits the stages 0..S−1, S−1..0, 0..S−1: its segments
(runs of consecutive calls of one stage).

Every stage keeps its own copy of the streams. A value read by a call of stage R but written by a
call of another stage W is sent once, W to R, at the end of the writer's segment, and received at
the start of R's next segment (messages): token coordinates (liveness.py's last writers, walked forward)
and prefix-block versions. The input layer and version 0 of the blocks are every stage's own.
Each cut is, of the block boundaries within SLACK of a stage's cost from the balanced point, the
one where the fewest elements cross between calls (the blocks that are only returned as the new
prefixes, on the last call's stage, are left out: a run that keeps θ' on its stages needs none). tintc/eval/stages.py runs the plan on ranks.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from ir.errors import BackendError

from .calls import runs_of
from .liveness import Accesses
from .primitives import Attention, projections
from .program import TOKENS, Program
from .stream_io import stream_block

MOVED = 4.0  # cost of one stream element gathered or written, in multiply-adds (memory-bound work)
SLACK = 0.1  # a cut may move this share of one stage's cost away from the balanced point to cross less
LOCAL = ("unembed",)  # streams every stage makes from the prefixes itself (with every block's version 0)


@dataclass(frozen=True)
class Segment:
    stage: int
    start: int
    stop: int  # calls [start, stop)


@dataclass(frozen=True)
class Message:
    """What stage `sender` hands stage `receiver` after segment `sent`; received before segment `received`."""
    sent: int
    received: int
    sender: int
    receiver: int
    tokens: tuple[tuple[int, int], ...]  # (start, size) runs of token-stream coordinates
    blocks: tuple[str, ...]  # prefix-block streams ("block@version")
    elements: int  # per sequence: coordinates × T + the blocks' K × width
    returned: int = 0  # of which blocks sent only to be returned as the new prefixes (not read by a call)


@dataclass(frozen=True)
class Plan:
    stages: int
    owner: tuple[int, ...]  # per call, its stage
    segments: tuple[Segment, ...]
    messages: tuple[Message, ...]
    costs: tuple[float, ...]  # per stage, call_cost summed

    @property
    def elements(self) -> int:
        """Elements sent per sequence, all messages together."""
        return sum(m.elements for m in self.messages)

    @property
    def between_calls(self) -> int:
        """Elements sent per sequence for calls to read (the new prefixes' blocks left out)."""
        return sum(m.elements - m.returned for m in self.messages)

    def calls_of(self, stage: int) -> list[tuple[int, int]]:
        return [(s.start, s.stop) for s in self.segments if s.stage == stage]


# -- the cost of a call ------------------------------------------------------------------------
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
    attention, of the scores and the weighted sum) plus MOVED per element gathered or written.
    On GPT-2 (T=256, one thread) 0.11 to 0.17 ns per unit for the kinds of call that take 95% of the time."""
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


# -- who runs what -----------------------------------------------------------------------------
def call_blocks(program: Program) -> list[str]:
    """Per call, the prefix block it reads or writes (else the previous call's; the first block for
    calls before any)."""
    named = []
    for call in program.calls:
        streams = [r.stream for r in call.reads] + [call.write.stream]
        blocks = [stream_block(s)[0] for s in streams if s != TOKENS and s not in LOCAL]
        named.append(blocks[0] if blocks else None)
    first = next((b for b in named if b is not None), None)
    out, current = [], first
    for block in named:
        current = block or current
        out.append(current)
    return out


def owners(program: Program, cuts: list[int], order: list[str], blocks: list[str]) -> tuple[int, ...]:
    """Per call, its stage: the stage of its block, blocks `order[cuts[k]:cuts[k+1]]` in stage k."""
    stage_of = {b: k for k in range(len(cuts) - 1) for b in order[cuts[k] : cuts[k + 1]]}
    return tuple(stage_of[b] if b is not None else 0 for b in blocks)


def segments_of(owner) -> tuple[Segment, ...]:
    out = []
    for i, stage in enumerate(owner):
        if out and out[-1].stage == stage:
            out[-1] = Segment(stage, out[-1].start, i + 1)
        else:
            out.append(Segment(stage, i, i + 1))
    return tuple(out)


# -- what crosses ------------------------------------------------------------------------------
def messages(program: Program, owner, segments, length: int) -> tuple[Message, ...]:
    """Walk the calls forward: a read by stage R of a value another stage wrote, and that R does not
    hold yet, is sent after the writer's segment. The output head reads on the last call's stage."""
    n, stages = len(program.calls), max(owner) + 1
    segment_of = [k for k, s in enumerate(segments) for _ in range(s.start, s.stop)]
    # liveness.py's accesses: the last writer of each coordinate (the input layer or none: every stage's own)
    accesses = Accesses(program.width, [(f.start, f.width) for f in program.inputs.values()])
    held = accesses.last_write.repeat(stages, 1)  # per stage, the writer of the value it holds
    tokens, blocks = defaultdict(list), defaultdict(list)  # (sending segment, receiver) -> coordinates, streams
    made = {c.write.stream: i for i, c in enumerate(program.calls) if c.write.stream != TOKENS}
    delivered, returned = set(), set()

    def read(stage: int, fields, streams, output: bool = False) -> None:
        for start, size in fields:
            writer, mine = accesses.last_write[start : start + size], held[stage, start : start + size]
            need = writer != mine
            if bool(need.any()):
                coords = torch.arange(start, start + size)[need]
                for w in writer[need].unique().tolist():
                    tokens[(segment_of[w], stage)].append(coords[writer[need] == w])
                mine.copy_(writer)
        for stream in streams:
            if stream in made and owner[made[stream]] != stage and (stream, stage) not in delivered:
                delivered.add((stream, stage))
                blocks[(segment_of[made[stream]], stage)].append(stream)
                if output:
                    returned.add(stream)

    for i, call in enumerate(program.calls):
        fields, written = call.token_fields()
        if any(r.stream == TOKENS and not r.groups for r in call.reads):
            fields = [(0, program.width)]
        read(owner[i], fields, [r.stream for r in call.reads] + [call.write.base])
        accesses.write(i, written)
        for start, size in written:
            held[owner[i], start : start + size] = i
    read(owner[-1], [(program.logits.start, program.logits.width)], program.final_blocks.values(), output=True)

    def size(streams) -> int:
        return sum(b.tokens * b.width for b in (program.layout.blocks[stream_block(s)[0]] for s in streams))

    out = []
    for sent, receiver in sorted(set(tokens) | set(blocks)):
        coords = torch.cat(tokens[(sent, receiver)]).unique().tolist() if tokens[(sent, receiver)] else []
        sent_blocks = tuple(blocks[(sent, receiver)])
        received = next((k for k in range(sent + 1, len(segments)) if segments[k].stage == receiver), None)
        if received is None:  # the output head's reads, on the last segment's stage
            raise BackendError(f"stage plan: stage {receiver} reads values of segment {sent} but runs no later segment")
        out.append(Message(sent, received, segments[sent].stage, receiver, runs_of(coords), sent_blocks,
                           len(coords) * length + size(sent_blocks), size(s for s in sent_blocks if s in returned)))
    return tuple(out)


def plan(program: Program, stages: int, length: int) -> Plan:
    """`stages` stages of about equal estimated cost for inputs of `length` tokens."""
    blocks = call_blocks(program)
    order = list(dict.fromkeys(b for b in blocks if b is not None))
    if not 1 <= stages <= max(len(order), 1):
        raise BackendError(f"stages: got {stages}; allowed: 1 to the program's {len(order)} prefix blocks")
    costs = [call_cost(program, i, length) for i in range(len(program.calls))]
    per_block = defaultdict(float)
    for block, cost in zip(blocks, costs):
        per_block[block] += cost
    before = [0.0]  # cost of the blocks order[:j]
    for block in order:
        before.append(before[-1] + per_block[block])
    share = before[-1] / stages
    cuts = [0]
    for k in range(1, stages):  # the balanced block boundaries, at least one block per stage
        allowed = range(cuts[-1] + 1, len(order) - (stages - k) + 1)
        cuts.append(min(allowed, key=lambda j: abs(before[j] - k * share)))
    cuts.append(len(order))

    def built(cuts):
        owner = owners(program, cuts, order, blocks)
        segments = segments_of(owner)
        return owner, segments, messages(program, owner, segments, length)

    def crossing(cuts) -> int:  # per sequence, between calls: the new prefixes are gathered once, at the end
        return sum(m.elements - m.returned for m in built(cuts)[2])

    for k in range(1, stages):  # each cut in turn: the block boundary near balance where the fewest elements cross
        near = [j for j in range(cuts[k - 1] + 1, cuts[k + 1]) if abs(before[j] - k * share) <= SLACK * share]
        cuts[k] = min(near or [cuts[k]], key=lambda j: (crossing(cuts[:k] + [j] + cuts[k + 1:]), abs(before[j] - k * share)))
    owner, segments, sent = built(cuts)
    stage_costs = [0.0] * stages
    for stage, cost in zip(owner, costs):
        stage_costs[stage] += cost
    return Plan(stages, owner, segments, sent, tuple(stage_costs))
