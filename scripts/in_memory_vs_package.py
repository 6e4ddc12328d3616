"""Issue 24 item 2: the in-memory TinT (what `bench`'s exactness rows time) against its emitted package.

    PYTHONPATH=. python scripts/in_memory_vs_package.py [n_layer] [repeats]

Compiles GPT-2 shapes (768 wide, n_layer layers, K = 256, T = 256) with every rule exact, then times one
forward (median of `repeats` after a warm-up) four ways: the in-memory TinT right after the compile; the
same after tintc/report/exactness.py's costs() (the standard view's dense count, which the exactness
rows make before they time); the emitted package loaded in this process; the package in a fresh
process. Each line carries the load average: on a shared machine compare lines of one run only.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from backends.torch.emit import import_package
from tintc import pipeline
from tintc.config import parse_config
from tintc.oracle.fidelity import example_input
from tintc.report.exactness import costs

VOCAB, LENGTH = 50257, 256
FRESH = """
import json, os, statistics, sys, time, torch
from backends.torch.emit import import_package
from tintc.oracle.fidelity import example_input
tint = import_package(sys.argv[1]).load(sys.argv[1])
prefixes = tint.encode(torch.load(os.path.join(sys.argv[1], "theta.pt")))
ids, train, _ = example_input(int(sys.argv[2]), int(sys.argv[3]), 1, seed=0)
times = []
with torch.no_grad():
    for _ in range(int(sys.argv[4]) + 1):
        start = time.perf_counter()
        tint(ids, train, prefixes)
        times.append(time.perf_counter() - start)
print(json.dumps(times[1:]))
"""


def line(what: str, times: list[float]) -> None:
    print(json.dumps({"what": what, "median_s": statistics.median(times), "runs_s": times,
                      "load": os.getloadavg()[0]}), flush=True)


def timed(tint, theta, repeats: int) -> list[float]:
    prefixes = tint.encode(theta)
    ids, train, _ = example_input(VOCAB, LENGTH, 1, seed=0)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first is the warm-up
            start = time.perf_counter()
            tint(ids, train, prefixes)
            times.append(time.perf_counter() - start)
    return times[1:]


def main(n_layer: int = 2, repeats: int = 3) -> None:
    cfg = parse_config(json.dumps({
        "model": {"family": "gpt2", "config": {"n_embd": 768, "n_layer": n_layer, "n_head": 12, "vocab_size": VOCAB,
                                               "n_positions": 1024}},
        "tint": {"prefixes": 256, "max_length": LENGTH, "approximations": "exact"}}))
    compiled = pipeline.compile_tint(cfg)
    theta = {n: p.detach() for n, p in compiled.model.named_parameters()}
    line("in-memory, right after the compile", timed(compiled.tint, theta, repeats))
    costs(compiled)
    line("in-memory, after costs()", timed(compiled.tint, theta, repeats))
    with tempfile.TemporaryDirectory(prefix="tintc-in-memory-") as directory:
        pipeline.emit(compiled, cfg, directory)
        torch.save(theta, os.path.join(directory, "theta.pt"))
        line("package, loaded in this process", timed(import_package(directory).load(directory), theta, repeats))
        fresh = subprocess.run([sys.executable, "-c", FRESH, directory, str(VOCAB), str(LENGTH), str(repeats)],
                               capture_output=True, text=True, check=True,
                               env={**os.environ, "PYTHONPATH": os.getcwd()})
        line("package, fresh process", json.loads(fresh.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
