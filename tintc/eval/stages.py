"""Pipeline stages: a TinT's calls split over the ranks of a torchrun launch (`--stages N`).

Rank s runs stage s of the plan (backends/torch/stage_plan.py: the stages follow the aux layers, so
the program visits them up, down and up again, one segment at a time). For each of its segments, in
program order, a rank runs every micro-batch (eval's chunks, verify's sequences): it receives the
messages due before the segment, runs the segment's calls on that micro-batch's streams, and sends
what later segments of other ranks read, by point-to-point isend/recv (gloo on CPU, nccl on CUDA;
the group of distributed.py). While rank s+1 works on micro-batch m, rank s works on m+1. Every rank
builds the input layer and holds the prefixes of θ itself, so neither crosses; the rank of the last
call runs the output head. Each message tensor has its own tag, so sends and receives match
whatever their order.

Why point-to-point and not torch.distributed.pipelining: that API splits a module whose stages pass
tensors in a fixed signature, each stage once per micro-batch; here a stage runs up to three times
per micro-batch (forward, backward, evaluation), each message is a different set of streams, and a
forward-only run needs no schedule beyond this one. Each rank runs exactly the single process's
calls on the same values, so the result is the same bit for bit.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from backends.torch import stage_plan
from backends.torch.calls import MAX_RUNS
from backends.torch.program import TOKENS
from backends.torch.stream_io import stream_block
from ir.errors import ConfigError


def check_stages(stages: int, group) -> None:
    """--stages N runs one stage per rank: N must be the torchrun world size."""
    if stages != group.world:
        raise ConfigError(f"--stages: got {stages} with {group.world} process(es); allowed: the number of "
                          f"processes (torchrun --nproc-per-node {stages} -m tintc.cli ... --stages {stages})")


@dataclass
class StageTimes:
    """One rank's part: its segments' calls, its wall seconds over all micro-batches, its peak memory."""
    rank: int
    calls: list[tuple[int, int]]
    seconds: float
    peak_bytes: int
    sent_elements: int  # per sequence, from this rank to others


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


class Pipeline:
    """This rank's stage of `tint` (backends/torch/tint.py) for inputs of `length` tokens."""

    def __init__(self, tint, group, stages: int, length: int):
        check_stages(stages, group)
        self.tint, self.group = tint, group
        self.plan = stage_plan.plan(tint.program, stages, length)
        self.tensors = 1 + max([len(m.blocks) for m in self.plan.messages] + [0])  # per message, for the tags

    @property
    def last(self) -> bool:
        return self.plan.owner[-1] == self.group.rank

    def run(self, micro_batches, prefixes, lr=None) -> tuple[list | None, StageTimes]:
        """Every micro-batch (input_ids, train_mask, label_mask) through this rank's segments at learning
        rate `lr` (None: the config's); on the last rank each one's (logits, new prefixes), None elsewhere;
        and this rank's times."""
        rank, plan, streams, sends = self.group.rank, self.plan, {}, []
        start = time.perf_counter()
        with torch.no_grad():
            for k, segment in enumerate(plan.segments):
                if segment.stage != rank:
                    continue
                for m, (ids, train, labels) in enumerate(micro_batches):
                    if m not in streams:
                        streams[m] = self.tint.begin(ids, train, prefixes, labels, lr)
                early, late = self._due(k)
                for message in early:  # all micro-batches, in the order the sender sent them
                    for m in range(len(micro_batches)):
                        self._receive(streams[m], message, self._tag(message, m, len(micro_batches)))
                for m in range(len(micro_batches)):
                    for message in late:
                        self._receive(streams[m], message, self._tag(message, m, len(micro_batches)))
                    self.tint.run(streams[m], segment.start, segment.stop)
                    for message in plan.messages:
                        if message.sent == k:
                            sends += self._send(streams[m], message, self._tag(message, m, len(micro_batches)))
            outputs = [self.tint.finish(streams[m], prefixes) for m in range(len(micro_batches))] if self.last else None
        for work in sends:
            work.wait()
        device = next(iter(prefixes.values())).device
        sent = sum(m.elements for m in plan.messages if m.sender == rank)
        return outputs, StageTimes(rank, plan.calls_of(rank), time.perf_counter() - start, peak_bytes(device), sent)

    def _due(self, segment: int) -> tuple[list, list]:
        """The messages this rank receives before `segment`: those to take for every micro-batch first,
        and per sender the one from its latest segment, taken micro-batch by micro-batch. So each
        sender's messages arrive in the order it sent them (nccl matches by order, gloo by tag too)."""
        due = [m for m in self.plan.messages if m.received == segment and m.receiver == self.group.rank]
        latest = {}
        for message in due:
            latest[message.sender] = max(latest.get(message.sender, -1), message.sent)
        return ([m for m in due if m.sent != latest[m.sender]], [m for m in due if m.sent == latest[m.sender]])

    def _tag(self, message: stage_plan.Message, micro_batch: int, micro_batches: int) -> int:
        """The first tag of this message's tensors for this micro-batch (one per tensor)."""
        return (self.plan.messages.index(message) * micro_batches + micro_batch) * self.tensors

    def _send(self, streams: dict, message: stage_plan.Message, tag: int) -> list:
        h, tensors = streams[TOKENS], [streams[b].contiguous() for b in message.blocks]
        if 0 < len(message.tokens) <= MAX_RUNS:
            tensors.append(torch.cat([h[..., s : s + n] for s, n in message.tokens], -1))
        elif message.tokens:
            tensors.append(h[..., _index(message, h.device)])
        return [_Sent(dist.isend(t, message.receiver, tag=tag + i), t) for i, t in enumerate(tensors)]

    def _receive(self, streams: dict, message: stage_plan.Message, tag: int) -> None:
        """Fill `message` into `streams`, as its sender sends it."""
        h = streams[TOKENS]
        batch, length = h.shape[:2]
        for i, name in enumerate(message.blocks):  # the blocks first, then the token coordinates
            block = self.tint.program.layout.blocks[stream_block(name)[0]]
            streams[name] = torch.empty(batch, block.tokens, block.width, dtype=h.dtype, device=h.device)
            dist.recv(streams[name], message.sender, tag=tag + i)
        if not message.tokens:
            return
        tokens = torch.empty(batch, length, sum(n for _, n in message.tokens), dtype=h.dtype, device=h.device)
        dist.recv(tokens, message.sender, tag=tag + len(message.blocks))
        if len(message.tokens) <= MAX_RUNS:
            offset = 0
            for s, n in message.tokens:
                h[..., s : s + n] = tokens[..., offset : offset + n]
                offset += n
        else:
            h[..., _index(message, h.device)] = tokens


class _Sent:
    """A send in flight and its tensor, kept alive until the send completes."""

    def __init__(self, work, tensor):
        self.work, self.tensor = work, tensor

    def wait(self) -> None:
        self.work.wait()


def _index(message: stage_plan.Message, device) -> torch.Tensor:
    return torch.cat([torch.arange(s, s + n, device=device) for s, n in message.tokens])


def staged_forward(group, stages: int):
    """A forward for pipeline.verify: the batch's sequences as micro-batches through the stages; the
    logits and new prefixes of the whole batch on the last rank, None on the others."""
    def forward(tint, input_ids, train_mask, prefixes, labels, lr=None):
        rows = range(input_ids.shape[0])
        outputs, _ = Pipeline(tint, group, stages, input_ids.shape[1]).run(
            [(input_ids[b : b + 1], train_mask[b : b + 1], None if labels is None else labels[b : b + 1])
             for b in rows], prefixes, lr)
        if outputs is None:
            return None
        blocks = tint.program.layout.blocks  # each micro-batch's blocks are [1, K, width]: one batch of them
        new = {name: torch.cat([o[1][name] for o in outputs]) if name in blocks else value
               for name, value in outputs[0][1].items()}
        return torch.cat([logits for logits, _ in outputs]), new
    return forward
