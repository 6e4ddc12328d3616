"""Full-size TinT measurements: compile time, errors, TinT forward vs direct autograd, peak memory.

    python bench/tint_full_size.py examples/gpt2.yaml --length 256

Peak memory is the process's maximum resident set, so each part runs in its own process
(`--part compile|tint|direct|errors`); without --part all parts run one after another.
Not a test: full-size shapes take minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def run_part(part: str, config: str, length: int) -> dict:
    from tintc import pipeline
    from tintc.config import load_config
    from tintc.fidelity import example_input
    from tintc.reference import TrainSettings, exact_gd

    cfg = load_config(config)
    model = pipeline.load_aux_model(cfg)
    vocab = model.config.vocab_size
    ids, train, labels = example_input(vocab, length, 1, seed=cfg.model.seed)
    result: dict = {"part": part}
    if part == "direct":  # forward + backward + SGD + evaluation forward, by autograd on the HF model
        graph = pipeline.trace(cfg, model)
        settings = TrainSettings.from_config(cfg, graph.attrs["n_layer"])
        exact_gd(model, graph, ids, train, settings, before=False)  # warm-up
        start = time.perf_counter()
        exact_gd(model, graph, ids, train, settings, before=False)
        result["seconds"] = time.perf_counter() - start
    else:
        compiled = pipeline.compile_tint(cfg, model)
        result["compile_seconds"] = compiled.seconds
        result["width"] = compiled.tint.program.width
        result["calls"] = len(compiled.tint.program.calls)
        if part == "tint":
            params = {n: p.detach() for n, p in model.named_parameters()}
            prefixes = compiled.tint.encode(params)
            with torch.no_grad():
                start = time.perf_counter()
                compiled.tint(ids, train, prefixes)
                result["seconds"] = time.perf_counter() - start
        elif part == "errors":
            v = pipeline.verify(cfg, compiled, ids, train, labels)
            result.update(construction=v.construction, approximation=v.approximation, tint_seconds=v.tint_seconds)
    result["peak_gb"] = _peak_gb()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--part", choices=["compile", "tint", "direct", "errors"])
    args = parser.parse_args()
    if args.part:
        print(json.dumps(run_part(args.part, args.config, args.length)))
        return
    for part in ("compile", "direct", "tint", "errors"):
        out = subprocess.run([sys.executable, __file__, args.config, "--length", str(args.length), "--part", part],
                             capture_output=True, text=True)
        print(out.stdout.strip() or out.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
