"""A 1B-class TinT against ĝ within this machine's 24 GB: `tintc verify` holds the TinT's run, ĝ in
float32 and float64 and exact GD at once (fine up to a few hundred million parameters); here they run
one after the other, each from θ saved to disk, and the updates are compared tensor by tensor from
disk, so that at most θ in float64 and one run's activations are held (ĝ steps in place:
tintc/oracle/reference.py's in_place).

    PYTHONPATH=. python scripts/verify_at_scale.py CONFIG [--length 256] [--work DIR]

Prints, on seeded random ids (the first half train) at the config's learning rate, the errors of
DESIGN §1 for three pairs: the TinT (its dtype) against ĝ in the same dtype (the construction), ĝ in
that dtype against ĝ in float64 (the rounding floor), the TinT against ĝ in float64; and the process's
peak resident memory after each phase. The TinT is compiled from the config's shapes (random weights
from its seed) and runs in memory, as `tintc verify` runs it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tintc import bench, pipeline
from tintc.config import load_config
from tintc.oracle import metrics
from tintc.oracle.reference import TrainSettings, approx_gd, update_masks


def peak_gib() -> float:
    return bench._peak_mib() / 1024  # the bench's reading of this process's peak


def tensors(path: Path, dtype=None) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, read one at a time (and converted to `dtype`, one at a time)."""
    with safe_open(str(path), "pt") as f:
        return {name: f.get_tensor(name) if dtype is None else f.get_tensor(name).to(dtype) for name in f.keys()}


def update_errors(run: Path, ref: Path, names) -> float:
    """The worst ‖Δθ_run − Δθ_ref‖ / ‖Δθ_ref‖ over the trained tensors, each read from the two files."""
    worst = 0.0
    with safe_open(str(run), "pt") as a, safe_open(str(ref), "pt") as b:
        for name in names:
            ua, ub = a.get_tensor(name).double(), b.get_tensor(name).double()
            worst = max(worst, ((ua - ub).norm() / ub.norm()).item())
    return worst


def save_updates(path: Path, after: dict, theta: Path, names) -> None:
    """Δθ = θ_N − θ of the trained tensors (θ read back from its file), in θ_N's dtype, written over θ_N
    (so that no second copy of the model is held)."""
    with safe_open(str(theta), "pt") as f:
        updates = {}
        for n in names:
            updates[n] = after[n].reshape(f.get_slice(n).get_shape())
            updates[n].sub_(f.get_tensor(n).to(updates[n].dtype))
    save_file(updates, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--work", help="a folder for θ and the updates (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tintc-scale-") as scratch:
        work = Path(args.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        print(json.dumps(verify_at_scale(args.config, args.length, work)))


def verify_at_scale(config: str, length: int, work: Path) -> dict:
    cfg = load_config(config)
    start = time.perf_counter()
    compiled = pipeline.compile_tint(cfg)  # from shapes
    tint, graph = compiled.tint, compiled.graph
    phases = {"compile": {"seconds": time.perf_counter() - start, "peak_gib": peak_gib()}}
    ids, train, label_mask = pipeline.example_or_text(cfg, graph, length)
    labels = label_mask if cfg.tint.train.loss == "label_only" else None
    settings = TrainSettings.from_config(cfg, graph.attrs["n_layer"])
    theta = work / "theta.safetensors"
    params = {n: p.detach() for n, p in compiled.model.named_parameters()}
    save_file({n: p.contiguous() for n, p in params.items()}, str(theta))
    trained = list(update_masks(graph, params, settings))
    dtype = next(iter(params.values())).dtype
    low_name = str(dtype).removeprefix("torch.")  # the TinT's dtype, ĝ's first run

    start = time.perf_counter()  # the TinT, in memory, from θ's prefixes (copies: the aux model is let go)
    prefixes = tint.encode(params)
    del params
    compiled._model = None  # read back from disk from here on
    with torch.no_grad():
        logits, prefixes = tint(ids, train, prefixes, labels)
    save_updates(work / "tint.safetensors", tint.decode(prefixes), theta, trained)
    del prefixes
    phases["tint"] = {"seconds": time.perf_counter() - start, "peak_gib": peak_gib()}

    runs = {}
    for name, run_dtype in ((low_name, None), ("float64", torch.float64)):
        start = time.perf_counter()
        own = tensors(theta, run_dtype)
        result = approx_gd(graph, own, ids, train, settings, labels, in_place=True)
        save_updates(work / f"g_hat_{name}.safetensors", result.params, theta, trained)
        runs[name] = SimpleNamespace(logits=result.logits, logits_before=result.logits_before)
        del own, result
        phases[f"g_hat {name}"] = {"seconds": time.perf_counter() - start, "peak_gib": peak_gib()}

    low, high = runs[low_name], runs["float64"]
    tint_run = SimpleNamespace(logits=logits, logits_before=low.logits_before)
    evaluated = metrics.eval_mask(train)

    def errors(run, ref, run_file, ref_file):
        out = metrics.logit_change_errors(run, ref, evaluated)
        out["logits_rel"] = ((run.logits - ref.logits).norm() / ref.logits.norm()).item()
        out["worst_update_rel"] = update_errors(work / run_file, work / ref_file, trained)
        return out

    low_file, high_file = f"g_hat_{low_name}.safetensors", "g_hat_float64.safetensors"
    return {"config": cfg.name, "length": ids.shape[1], "dtype": str(dtype), "trained_tensors": len(trained),
            "tint_vs_g_hat": errors(tint_run, low, "tint.safetensors", low_file),
            "rounding_floor": errors(low, high, low_file, high_file),
            "tint_vs_g_hat_float64": errors(tint_run, high, "tint.safetensors", high_file),
            "phases": phases}


if __name__ == "__main__":
    main()
