"""Time a TinT's forward in pipeline stages against one process (a measurement, not a test).

    python scripts/stage_timing.py prepare CONFIG FILE [--length T] [--micro-batches M]
        compile CONFIG, and save the TinT, the prefixes of θ and M seeded inputs of T tokens to FILE
    torchrun --standalone --nproc-per-node S scripts/stage_timing.py run FILE
        S stages (S = 1: the plain forward); prints one JSON line per rank: its calls, seconds over the
        M micro-batches, peak resident memory (ru_maxrss), elements it sends per sequence (and rank 0 the plan); the last rank
        saves its logits to FILE.logits-S for comparing runs bit for bit

Every rank loads the saved TinT, so its peak is the run's (with the whole TinT and every prefix
block on every rank), not the compile's. Run from the repository root with PYTHONPATH set to it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch


def prepare(config: Path, out: Path, length: int, micro_batches: int) -> None:
    from tintc import pipeline
    from tintc.config import load_config
    from tintc.oracle.fidelity import example_input

    cfg = load_config(config)
    compiled = pipeline.compile_tint(cfg)
    params = {n: p.detach() for n, p in compiled.model.named_parameters()}
    inputs = [example_input(compiled.graph.attrs["vocab"], length, 1, seed=seed)[:2] for seed in range(micro_batches)]
    torch.save({"tint": compiled.tint, "prefixes": compiled.tint.encode(params), "inputs": inputs}, out)


def run(saved: Path) -> None:
    from tintc.eval.distributed import Group
    from tintc.eval.stages import Pipeline

    group = Group.from_environment("cpu")
    data = torch.load(saved, weights_only=False)
    tint, prefixes, inputs = data["tint"], data["prefixes"], data["inputs"]
    length = inputs[0][0].shape[1]
    group.barrier()
    if group.world == 1:
        start = time.perf_counter()
        with torch.no_grad():
            logits = [tint(ids, train, prefixes)[0] for ids, train in inputs]
        seconds, calls, sent = time.perf_counter() - start, [(0, len(tint.program.calls))], 0
    else:
        start = time.perf_counter()
        pipeline = Pipeline(tint, group, group.world, length)
        if group.rank == 0:
            print(json.dumps({"plan_seconds": round(time.perf_counter() - start, 2), "segments": [
                (s.stage, s.start, s.stop) for s in pipeline.plan.segments], "costs": pipeline.plan.costs,
                "messages": [(m.sender, m.receiver, m.elements, m.returned, len(m.blocks)) for m in pipeline.plan.messages]}))
        outputs, times = pipeline.run([(ids, train, None) for ids, train in inputs], prefixes)
        logits = None if outputs is None else [out[0] for out in outputs]
        seconds, calls, sent = times.seconds, times.calls, times.sent_elements
    group.barrier()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"rank": group.rank, "stages": group.world, "calls": calls, "micro_batches": len(inputs),
                      "T": length, "seconds": round(seconds, 3), "peak_gib": round(peak, 3),
                      "sent_elements_per_sequence": sent, "threads": torch.get_num_threads(),
                      "load": os.getloadavg()[0]}), flush=True)
    if logits is not None:
        torch.save(logits, f"{saved}.logits-{group.world}")
    group.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("config", type=Path)
    p.add_argument("file", type=Path)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--micro-batches", type=int, default=4)
    r = sub.add_parser("run")
    r.add_argument("file", type=Path)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.config, args.file, args.length, args.micro_batches)
    else:
        run(args.file)


if __name__ == "__main__":
    main()
