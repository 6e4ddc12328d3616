"""The scale curve of several `tintc bench` results (a measurement, not a test): TinT and direct
time, peak memory, their ratios and the stream's width against the aux model's parameters at one T,
and the time ratio against T for each config.

    python scripts/scale_curve.py OUT CONFIG... [--length 256]
        reads the bench.json that `tintc bench CONFIG` wrote under each config's output, and writes
        OUT/scale.md (the table) and OUT/scale.png (four panels)

The aux parameters are counted from each config's shapes as a compile counts them (tied tensors
once). Run from the repository root with PYTHONPATH set to it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(configs: list[Path]) -> list[dict]:
    """One entry per config: its rules, aux parameters, width and measured rows, smallest model first."""
    import ir.frontend
    from tintc import pipeline
    from tintc.config import load_config

    entries = []
    for path in configs:
        cfg = load_config(path)
        bench = cfg.resolved_output / "bench.json"
        if not bench.exists():
            raise SystemExit(f"{path}: no {bench}; run `tintc bench {path}` first")
        result = json.loads(bench.read_text())
        meta = ir.frontend.meta_model(cfg.model.family, pipeline.aux_config(cfg), cfg.torch_dtype)
        rows = [r for r in result["runs"] if "time_ratio" in r]
        entries.append({"config": result["config"], "rules": result["rules"],
                        "aux": sum(p.numel() for p in meta.parameters()), "width": result["compile"]["width"],
                        "rows": {r["length"]: r for r in rows}})
    return sorted(entries, key=lambda e: e["aux"])


def table(entries: list[dict], length: int) -> str:
    lines = [f"| config | rules | aux parameters | stream width | TinT s | direct s | × direct | TinT peak MiB | "
             f"direct peak MiB | memory × |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in entries:
        r = e["rows"].get(length)
        figures = ["–"] * 6 if r is None else [
            f"{r['tint']['seconds']:.3g}", f"{r['direct']['seconds']:.3g}", f"{r['time_ratio']:.2f}",
            f"{r['tint']['peak_mib']:,.0f}", f"{r['direct']['peak_mib']:,.0f}", f"{r['memory_ratio']:.2f}"]
        lines.append(f"| {e['config']} | {e['rules']} | {e['aux'] / 1e6:,.0f}M | {e['width']:,} | " + " | ".join(figures) + " |")
    return "\n".join(lines) + "\n"


def plot(entries: list[dict], length: int):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    at = [e for e in entries if length in e["rows"]]
    aux = [e["aux"] for e in at]
    figure = Figure(figsize=(12, 8), layout="constrained")
    (seconds, ratio), (peak, by_length) = figure.subplots(2, 2)
    for part, marker in (("tint", "o"), ("direct", "s")):
        label = "TinT" if part == "tint" else "direct"
        seconds.plot(aux, [e["rows"][length][part]["seconds"] for e in at], marker=marker, label=label)
        peak.plot(aux, [e["rows"][length][part]["peak_mib"] for e in at], marker=marker, label=label)
    ratio.plot(aux, [e["rows"][length]["time_ratio"] for e in at], marker="o", label="time")
    ratio.plot(aux, [e["rows"][length]["memory_ratio"] for e in at], marker="s", label="peak memory")
    for e in entries:
        lengths = sorted(e["rows"])
        by_length.plot(lengths, [e["rows"][n]["time_ratio"] for n in lengths], marker="o",
                       label=f"{e['config']} ({e['rules']})")
    for axis, label in ((seconds, "seconds"), (peak, "peak MiB"), (ratio, "TinT ÷ direct")):
        axis.set_xscale("log")
        axis.set_xlabel("aux parameters")
        axis.set_ylabel(f"{label} at T={length}")
        axis.legend()
    seconds.set_yscale("log")
    ratio.set_ylim(bottom=0)
    by_length.set_xscale("log", base=2)
    by_length.set_xlabel("input length T")
    by_length.set_ylabel("time TinT ÷ direct")
    by_length.set_ylim(bottom=0)
    by_length.legend(fontsize="small")
    figure.suptitle("TinT forward vs direct autograd (exact_gd), by aux model size and by T")
    return figure


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("configs", type=Path, nargs="+")
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args(argv)
    entries = load(args.configs)
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(entries, args.length)
    (args.out / "scale.md").write_text(text)
    plot(entries, args.length).savefig(args.out / "scale.png", format="png", dpi=100)
    print(text, end="")
    print(f"wrote {args.out / 'scale.md'}, {args.out / 'scale.png'}")


if __name__ == "__main__":
    main()
