"""`tintc bench`: what a TinT costs against direct autograd, for several input lengths T.

Every measurement runs in a fresh Python process (`python -m tintc.bench PART …`) that prints
one JSON line, so that its peak memory is that process's own: the peak resident set size
(VmHWM) after its first run, the warm-up (after every run too, `peak_repeated_mib`). It counts the
interpreter and torch (a few hundred MiB, alike on both sides) besides weights, inputs and
activations; `base_mib` is the resident size just before the runs. The parts:

- compile: build the aux model, trace, passes, lowering (the compile time), then write the
  standalone package to the output directory (the emit time) and θ's prefixes for the TinT runs.
- tint: load the emitted package (torch and safetensors only) and the prefixes; one forward
  of the TinT on T tokens (a batch of `--batch` sequences, default one, each the first half train), under no_grad.
- direct: the aux model; `tintc.oracle.reference.exact_gd(..., before=False)` on the same input: per
  step a forward, a backward and the SGD update, then the evaluation forward; in the aux model's dtype
  (a bfloat16 TinT's is float32: torch's CPU bfloat16 kernels ran SmolLM2-135M's direct step 21× slower
  than float32 here, 63 s against 2.95 s at T = 256, on a machine without bfloat16 units).
- exactness (unless turned off): the cost of each exact backward rule against the paper's rules
  (tintc/report/exactness.py): the config compiled under each rule set, its parameters, calls and the
  in-memory TinT's forward time at T = EXACTNESS_LENGTH (or the TinT's max length if shorter).

Times are the median of `repeats` runs after one warm-up run; without `repeats`, 5 runs, fewer
(down to 1) when the warm-up shows that 5 would take more than 30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ir.errors import TintcError

LENGTHS = (64, 128, 256, 512)
EXACTNESS_LENGTH = 256
AUTO_REPEATS, AUTO_BUDGET_S = 5, 30.0


# -- the driver (parent process) ---------------------------------------------------------------
def run(config_path, lengths=LENGTHS, repeats: int | None = None, progress=lambda message: None,
        exactness: bool = True, force: bool = False, batch: int = 1) -> dict:
    """Compile in one process (writing the package and report under `output`; `force` as for compile),
    then for each T run the TinT and the direct evaluation in one each, on `batch` sequences (each its own
    context); then, with `exactness`, the cost of each exact rule in one more."""
    import tempfile

    import torch

    from tintc.config import load_config

    cfg = load_config(config_path)  # config errors stop here, before any process starts
    with tempfile.TemporaryDirectory(prefix="tintc-bench-") as work:
        progress(f"compiling {cfg.name}")
        compiled = _child(["compile", str(config_path), work] + (["--force"] if force else []))
        if "error" in compiled:
            raise TintcError(compiled["error"], headline="bench: compile failed")
        runs, skipped = [], []
        for length in lengths:
            if length > compiled["max_length"]:
                skipped.append({"length": length, "reason": f"above the TinT's max_length {compiled['max_length']}"})
                continue
            row = {"length": length}
            for part in ("tint", "direct"):
                progress(f"T={length}: {part}")
                args = [part, str(config_path), work, "--length", str(length), "--batch", str(batch)]
                row[part] = _child(args + (["--repeats", str(repeats)] if repeats else []))
            if "error" not in row["tint"] and "error" not in row["direct"]:
                row["time_ratio"] = row["tint"]["seconds"] / row["direct"]["seconds"]
                row["memory_ratio"] = row["tint"]["peak_mib"] / row["direct"]["peak_mib"]
            runs.append(row)
        cost = None
        if exactness and cfg.tint.dtype == "bfloat16":  # its cost is against the paper's rules
            cost = {"error": "not measured: a bfloat16 TinT runs the exact rules only (the paper's finite "
                             "differences lose every digit of bfloat16)"}
        elif exactness:
            progress(f"cost of exactness at T={EXACTNESS_LENGTH}")
            cost = _child(["exactness", str(config_path), work, "--length", str(EXACTNESS_LENGTH)]
                          + (["--repeats", str(repeats)] if repeats else []))
    return {"config": cfg.name, "family": cfg.model.family, "dtype": cfg.tint.dtype,
            "direct_dtype": str(cfg.torch_dtype).removeprefix("torch."), "torch": torch.__version__,
            "rules": cfg.tint.approximations.rule_set, "batch": batch,
            "threads": torch.get_num_threads(), "compile": compiled, "runs": runs, "skipped": skipped,
            "exactness": cost,
            "method": "one process per measurement; peak = VmHWM of that process after its first run (the "
                      "warm-up), peak_repeated after all; time = median after the warm-up; direct = "
                      "tintc.oracle.reference.exact_gd (see tintc/bench.py)"}


def _dtypes(result: dict) -> str:
    """The TinT's dtype, and the direct run's where it differs (a bfloat16 TinT's aux model is float32)."""
    direct = result.get("direct_dtype", result["dtype"])
    return result["dtype"] if direct == result["dtype"] else f"{result['dtype']} (direct: {direct})"


def _child(args: list[str]) -> dict:
    """Run one part in a fresh interpreter; its last stdout line is the JSON result."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, "-m", "tintc.bench", *args], capture_output=True, text=True, env=env)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-5:]
        return {"error": f"{args[0]} process exited with code {done.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


def table(result: dict):
    from rich.table import Table

    batch = result.get("batch", 1)
    title = (f"{result['config']}: TinT forward ({result.get('rules', '?')} rules) vs direct autograd (exact_gd), "
             f"{_dtypes(result)}, batch {batch}, {result['threads']} threads")
    t = Table(title=title)
    for column in ("T", "TinT s", "direct s", "time ×", "TinT tokens/s", "direct tokens/s", "TinT peak MiB",
                   "predicted", "direct peak MiB", "memory ×", "runs"):
        t.add_column(column, justify="right")
    for row in result["runs"]:
        tint, direct = row["tint"], row["direct"]
        if "error" in tint:
            t.add_row(str(row["length"]), *(["failed"] * 9), "", style="red")
            continue
        if "error" in direct:  # the TinT's figures still count (a 1B direct run can exceed the memory)
            t.add_row(str(row["length"]), f"{tint['seconds']:.4g}", "failed", "",
                      f"{batch * row['length'] / tint['seconds']:,.0f}", "", f"{tint['peak_mib']:,.0f}",
                      f"{tint['predicted_peak_mib']:,.0f}", "failed", "", f"{tint['runs']}/", style="yellow")
            continue
        tokens = batch * row["length"]
        t.add_row(str(row["length"]), f"{tint['seconds']:.4g}", f"{direct['seconds']:.4g}", f"{row['time_ratio']:.1f}",
                  f"{tokens / tint['seconds']:,.0f}", f"{tokens / direct['seconds']:,.0f}",
                  f"{tint['peak_mib']:,.0f}", f"{tint['predicted_peak_mib']:,.0f}", f"{direct['peak_mib']:,.0f}",
                  f"{row['memory_ratio']:.2f}",
                  f"{tint['runs']}/{direct['runs']}")
    return t


def notes(result: dict) -> list[str]:
    """What the table does not show: the compile, skipped lengths, failures."""
    c = result["compile"]
    lines = [f"compile: {c['compile_seconds']:.2f} s (trace, passes, lowering), package written in "
             f"{c['emit_seconds']:.2f} s, peak {c['peak_mib']:,.0f} MiB (predicted {c['predicted_peak_mib']:,.0f}); "
             f"TinT width {c['width']}, {c['calls']} calls, "
             f"{c['parameters']:,} parameters, max_length {c['max_length']}"]
    lines += [f"skipped T={s['length']}: {s['reason']}" for s in result["skipped"]]
    for row in result["runs"]:
        lines += [f"T={row['length']} {part}: {row[part]['error']}" for part in ("tint", "direct")
                  if "error" in row[part]]
    if result.get("exactness") and "error" in result["exactness"]:
        lines.append(f"cost of exactness: {result['exactness']['error']}")
    return lines


def exactness_table(result: dict):
    """The cost-of-exactness table (tintc/report/render.py's) for the terminal, or None."""
    from rich.table import Table

    from tintc.report.render import exactness_table as rendered

    cost = result.get("exactness")
    if not cost or "error" in cost:
        return None
    title, columns, rows = rendered(cost)
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in ("rules", "kinds") else "right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def save(result: dict, directory, force: bool = False, source: str | None = None) -> list[Path]:
    """bench.json and bench.png (time and peak memory against T) in `directory`."""
    from tintc.files import write_files

    figure = _plot(result)
    return write_files(directory, {"bench.json": json.dumps(result, indent=2) + "\n",
                                   "bench.png": lambda path: figure.savefig(path, format="png", dpi=100)},
                       force=force, source=source)


def _plot(result: dict):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    rows = [r for r in result["runs"] if "time_ratio" in r]
    lengths = [r["length"] for r in rows]
    figure = Figure(figsize=(10, 4), layout="constrained")
    time_axis, memory_axis = figure.subplots(1, 2)
    panels = ((time_axis, "seconds", "time (s), log scale"), (memory_axis, "peak_mib", "peak memory (MiB)"))
    for axis, key, label in panels:
        for part, marker in (("tint", "o"), ("direct", "s")):
            axis.plot(lengths, [r[part][key] for r in rows], marker=marker, label="TinT" if part == "tint" else part)
        if not rows:  # every run failed (notes() says why): an empty figure, and bench.json still written
            continue
        axis.set_xscale("log", base=2)
        axis.set_xticks(lengths, [str(n) for n in lengths])
        axis.xaxis.set_minor_locator(NullLocator())
        axis.set_xlabel("input length T")
        axis.set_ylabel(label)
        axis.legend()
    time_axis.set_yscale("log" if rows else "linear")
    memory_axis.set_ylim(bottom=0)
    figure.suptitle(f"{result['config']}: TinT forward vs direct autograd ({_dtypes(result)})")
    return figure


# -- the measurements (child processes) -------------------------------------------------------
def _peak_mib() -> float:
    """This process's peak resident memory. On Linux, VmHWM of /proc/self/status: ru_maxrss survives exec,
    so a child forked from a large process (a long pytest run) would report its parent's size."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _resident_mib() -> float | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _timed(fn, repeats: int | None) -> dict:
    """The median time of `repeats` runs after a warm-up, and the peak of one run (the warm-up, in this fresh
    process) beside the peak after all of them: glibc keeps some memory a run freed on its heap, so later
    runs can start higher (measured at the 360M shape: the TinT +300 MiB)."""
    start = time.perf_counter()
    fn()  # warm-up
    warm = time.perf_counter() - start
    peak = _peak_mib()
    runs = repeats or max(1, min(AUTO_REPEATS, int(AUTO_BUDGET_S / max(warm, 1e-9))))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "runs": runs, "warmup_seconds": warm, "peak_mib": peak,
            "peak_repeated_mib": _peak_mib()}


def measure_compile(config: str, work: Path, force: bool = False) -> dict:
    import torch
    from safetensors.torch import save_file

    from tintc import memory, pipeline
    from tintc.config import load_config

    cfg = load_config(config)
    compiled = pipeline.compile_tint(cfg)  # from the config alone
    peak = _peak_mib()  # the compile's, what the prediction is of (the save below renders the report's plot)
    start = time.perf_counter()
    pipeline.save(compiled, cfg, force=force)
    emit_seconds = time.perf_counter() - start
    program = compiled.tint.program
    result = {"compile_seconds": compiled.seconds, "emit_seconds": emit_seconds, "peak_mib": peak,
              "predicted_peak_mib": compiled.predicted.total / 2**20,
              "width": program.width, "calls": len(program.calls), "primitives": len(program.layers),
              "parameters": sum(p.numel() for p in compiled.tint.parameters()), "max_length": program.max_length,
              "threads": torch.get_num_threads()}
    # for the TinT runs: θ as prefixes, and what they need to know without reading the config
    model = compiled.model
    params = {n: p.detach() for n, p in model.named_parameters()}
    prefixes = {k: v.contiguous() for k, v in compiled.tint.encode(params).items()}
    save_file(prefixes, str(work / "prefixes.safetensors"))
    run = {"package": str(cfg.resolved_output), "vocab": model.config.vocab_size, "seed": cfg.model.seed,
           "label_only": cfg.tint.train.loss == "label_only", "shape": memory.run_shape(program)}
    (work / "run.json").write_text(json.dumps(run))
    return result


def _input(run: dict, length: int, batch: int = 1):
    from tintc.oracle.fidelity import example_input

    ids, train, labels = example_input(run["vocab"], length, batch, seed=run["seed"])
    return ids, train, labels if run["label_only"] else None


def measure_tint(work: Path, length: int, repeats: int | None, batch: int = 1) -> dict:
    import torch
    from safetensors.torch import load_file

    from backends.torch.emit import import_package
    from tintc import memory

    run = json.loads((work / "run.json").read_text())
    predicted = memory.run_prediction(run["shape"], length, batch, holds_package=False)  # before anything is loaded
    package = import_package(run["package"])
    tint = package.load(run["package"])
    prefixes = load_file(str(work / "prefixes.safetensors"))
    ids, train, labels = _input(run, length, batch)
    base = _resident_mib()

    def forward():
        with torch.no_grad():
            tint(ids, train, prefixes, labels)

    return {**_timed(forward, repeats), "predicted_peak_mib": predicted.total / 2**20,
            "base_mib": base, "threads": torch.get_num_threads()}


def measure_direct(config: str, work: Path, length: int, repeats: int | None, batch: int = 1) -> dict:
    import torch

    from tintc import pipeline
    from tintc.config import load_config
    from tintc.oracle.reference import TrainSettings, exact_gd

    cfg = load_config(config)
    model = pipeline.load_aux_model(cfg)
    graph = pipeline.trace(cfg, model)
    settings = TrainSettings.from_config(cfg, graph.attrs["n_layer"])
    ids, train, labels = _input(json.loads((work / "run.json").read_text()), length, batch)
    base = _resident_mib()
    timed = _timed(lambda: exact_gd(model, graph, ids, train, settings, labels, before=False), repeats)
    return {**timed, "base_mib": base, "threads": torch.get_num_threads()}


def measure_exactness(config: str, length: int, repeats: int | None) -> dict:
    from tintc.config import load_config
    from tintc.report.exactness import cost_of_exactness

    return cost_of_exactness(load_config(config), length=length, repeats=repeats or 3)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tintc.bench", description="one measurement of `tintc bench`")
    parser.add_argument("part", choices=["compile", "tint", "direct", "exactness"])
    parser.add_argument("config")
    parser.add_argument("work", type=Path, help="the bench's scratch directory")
    parser.add_argument("--length", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--batch", type=int, default=1, help="tint, direct: sequences per forward")
    parser.add_argument("--force", action="store_true", help="compile: overwrite files tintc did not write")
    args = parser.parse_args(argv)
    try:
        if args.part == "compile":
            result = measure_compile(args.config, args.work, args.force)
        elif args.part == "exactness":
            result = measure_exactness(args.config, args.length, args.repeats)
        elif args.part == "tint":
            result = measure_tint(args.work, args.length, args.repeats, args.batch)
        else:
            result = measure_direct(args.config, args.work, args.length, args.repeats, args.batch)
    except TintcError as error:
        result = {"error": str(error)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
