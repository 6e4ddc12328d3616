"""Data parallelism for `tintc eval`: one process, or the ranks of a `torchrun` launch.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and the rendezvous) in the environment; a plain
launch has none of them and runs as a group of one. gloo serves CPU runs, nccl CUDA runs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ir.errors import ConfigError


def check_device(requested: str) -> None:
    if requested == "cpu":
        return
    if not re.fullmatch(r"cuda(:\d+)?", requested):
        raise ConfigError(f"--device: got {requested!r}; allowed: cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device: got {requested!r}; allowed: cpu (this machine has no CUDA device)")
    index = int(requested.split(":")[1]) if ":" in requested else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device: got {requested!r}; allowed: cpu or cuda:0 to "
                          f"cuda:{torch.cuda.device_count() - 1}")


@dataclass(frozen=True)
class Group:
    rank: int
    world: int
    local_rank: int

    @classmethod
    def single(cls) -> "Group":
        return cls(0, 1, 0)

    @classmethod
    def from_environment(cls, device: str) -> "Group":
        """The group torchrun set up (initialised here), else a group of one."""
        check_device(device)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls.single()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def device(self, requested: str) -> str:
        """The device this rank runs on (checked): `cuda` means the rank's own GPU under torchrun."""
        check_device(requested)
        if requested == "cuda" and self.world > 1:
            requested = f"cuda:{self.local_rank}"
        if requested.startswith("cuda"):
            torch.cuda.set_device(torch.device(requested))  # nccl's collectives use the current device
        return requested

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, value):
        """Every rank's `value` on rank 0, in rank order, rank 0's own excluded; None on other ranks."""
        if self.world == 1:
            return []
        values = [None] * self.world if self.rank == 0 else None
        dist.gather_object(value, values, dst=0)
        return values[1:] if self.rank == 0 else None

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def merge_gathered(parts: tuple, gathered: list, lrs, rows) -> None:
    """Fold every rank's results into `parts`, this rank's: dicts keyed by chunk or example, the last
    one the runs [lr][row] of such dicts. Each chunk or example was run by exactly one rank."""
    *plain, runs = parts
    for *other_plain, other_runs in gathered:
        for mine, theirs in zip(plain, other_plain):
            mine.update(theirs)
        for lr in lrs:
            for row in rows:
                runs[lr][row].update(other_runs[lr][row])
