"""Pipeline stages: a TinT's calls split over the ranks of a torchrun launch (`--stages N`).

Rank s runs stage s (backends/torch/stage_plan.py: calls [start, stop), cut where few bytes cross)
on every micro-batch (eval's chunks, verify's sequences) and hands the next rank what crosses its
cut: the live token coordinates that a call wrote, as one [B, T, n] tensor, then each prefix-block
version still in use, by point-to-point send/recv (gloo on CPU, nccl on CUDA; the group of
distributed.py). Every rank builds the input layer and holds the prefixes of θ itself, so neither
crosses. The last rank runs the output head. While rank s+1 works on micro-batch m, rank s works
on m+1: one send per cut is in flight at a time, so a stage holds at most two micro-batches.

Why point-to-point and not torch.distributed.pipelining: that API splits a module whose stages pass
tensors in a fixed signature (traced by torch.export, or written as submodules); here the program is
already a flat list of calls, what crosses each cut is a different set of streams, and a forward-only
run needs no schedule beyond fill and drain. Each stage runs exactly the single process's calls on
the same values, so the result is the same bit for bit.
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
    """One rank's part: its calls, its wall seconds over all micro-batches, its peak memory."""
    rank: int
    calls: tuple[int, int]
    seconds: float
    peak_bytes: int
    crossing_elements: int  # per sequence, sent to the next rank (0 on the last)


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
        self.stage = self.plan[group.rank]

    @property
    def last(self) -> bool:
        return self.stage.sends is None

    def run(self, micro_batches, prefixes) -> tuple[list | None, StageTimes]:
        """Every micro-batch (input_ids, train_mask, label_mask) through this stage; on the last rank
        each one's (logits, new prefixes), None elsewhere; and this rank's times."""
        stage, outputs, in_flight = self.stage, [], []
        start = time.perf_counter()
        with torch.no_grad():
            for ids, train, labels in micro_batches:
                streams = self.tint.begin(ids, train, prefixes, labels)
                if stage.receives is not None:
                    self._receive(streams, stage.receives)
                self.tint.run(streams, stage.start, stage.stop)
                if stage.sends is None:
                    outputs.append(self.tint.finish(streams, prefixes))
                    continue
                for work in in_flight:  # the previous micro-batch has reached the next rank
                    work.wait()
                in_flight = self._send(streams, stage.sends)
        for work in in_flight:
            work.wait()
        device = next(iter(prefixes.values())).device
        times = StageTimes(self.group.rank, (stage.start, stage.stop), time.perf_counter() - start,
                           peak_bytes(device), 0 if stage.sends is None else stage.sends.elements)
        return (outputs if self.last else None), times

    def _payload(self, streams: dict, cut: stage_plan.Cut) -> list[torch.Tensor]:
        h = streams[TOKENS]
        if len(cut.tokens) <= MAX_RUNS:
            tokens = torch.cat([h[..., s : s + n] for s, n in cut.tokens], -1)
        else:
            tokens = h[..., _index(cut, h.device)]
        return [tokens.contiguous()] + [streams[b].contiguous() for b in cut.blocks]

    def _send(self, streams: dict, cut: stage_plan.Cut) -> list:
        tensors = self._payload(streams, cut)
        return [_Sent(dist.isend(t, self.group.rank + 1), t) for t in tensors]

    def _receive(self, streams: dict, cut: stage_plan.Cut) -> None:
        """Fill what crosses `cut` into `streams`, as the previous rank sends it."""
        h = streams[TOKENS]
        batch, length = h.shape[:2]
        tokens = torch.empty(batch, length, sum(n for _, n in cut.tokens), dtype=h.dtype, device=h.device)
        dist.recv(tokens, self.group.rank - 1)
        if len(cut.tokens) <= MAX_RUNS:
            offset = 0
            for s, n in cut.tokens:
                h[..., s : s + n] = tokens[..., offset : offset + n]
                offset += n
        else:
            h[..., _index(cut, h.device)] = tokens
        for name in cut.blocks:
            block = self.tint.program.layout.blocks[stream_block(name)[0]]
            streams[name] = torch.empty(batch, block.tokens, block.width, dtype=h.dtype, device=h.device)
            dist.recv(streams[name], self.group.rank - 1)


class _Sent:
    """A send in flight and its tensor, kept alive until the send completes."""

    def __init__(self, work, tensor):
        self.work, self.tensor = work, tensor

    def wait(self) -> None:
        self.work.wait()


def _index(cut: stage_plan.Cut, device) -> torch.Tensor:
    return torch.cat([torch.arange(s, s + n, device=device) for s, n in cut.tokens])


def staged_forward(group, stages: int):
    """A forward for pipeline.verify: the batch's sequences as micro-batches through the stages; the
    logits and new prefixes of the whole batch on the last rank, None on the others."""
    def forward(tint, input_ids, train_mask, prefixes, labels):
        rows = range(input_ids.shape[0])
        outputs, _ = Pipeline(tint, group, stages, input_ids.shape[1]).run(
            [(input_ids[b : b + 1], train_mask[b : b + 1], None if labels is None else labels[b : b + 1])
             for b in rows], prefixes)
        if outputs is None:
            return None
        blocks = tint.program.layout.blocks  # each micro-batch's blocks are [1, K, width]: one batch of them
        new = {name: torch.cat([o[1][name] for o in outputs]) if name in blocks else value
               for name, value in outputs[0][1].items()}
        return torch.cat([logits for logits, _ in outputs]), new
    return forward
