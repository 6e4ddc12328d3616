"""The cost of the emitted TinT's input check (backends/torch/checks.py) against one forward at T=256.

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/check_cost.py [n_embd] [n_layer]

Compiles a random GPT-2 of the given size with max_length 256, emits and loads the package,
and prints the median time of forward (which includes the check) and of the check alone.
"""

import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from backends.torch.checks import check_inputs
from tintc import pipeline
from tintc.config import parse_config


def median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(n_embd=64, n_layer=2):
    hf = {"n_embd": n_embd, "n_layer": n_layer, "n_head": 4, "vocab_size": 128, "n_positions": 256}
    cfg = parse_config(str({"model": {"family": "gpt2", "config": hf}, "tint": {"prefixes": 16, "max_length": 256}}))
    model = pipeline.load_aux_model(cfg)
    out = Path(tempfile.mkdtemp())
    pipeline.emit(pipeline.compile_tint(cfg, model), cfg, out)
    spec = importlib.util.spec_from_file_location("tint_model", out / "tint_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tint = module.load(out)
    prefixes = tint.encode({n: p.detach() for n, p in model.named_parameters()})
    ids = torch.randint(0, 128, (1, 256))
    train = torch.arange(256)[None] < 128
    with torch.no_grad():
        tint(ids, train, prefixes)  # warm-up
        forward = median_seconds(lambda: tint(ids, train, prefixes), 5)
    check = median_seconds(lambda: check_inputs(tint.contract, ids, train, None, prefixes), 200)
    print(f"gpt2 n_embd={n_embd} n_layer={n_layer}, T=256, threads {torch.get_num_threads()}: forward {forward * 1e3:.1f} ms, "
          f"check {check * 1e6:.0f} us = {100 * check / forward:.3f}% of the forward")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
