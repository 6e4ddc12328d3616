"""What the test files share: one relative error, and one compile → oracle → TinT → decode round
with one check of its result (beside tests/models.py, the table of tiny configs)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ir.frontend import trace
from tintc import pipeline
from tintc.oracle.fidelity import example_input
from tintc.oracle.reference import TrainSettings, approx_gd, exact_gd
from tests.models import TINY, tiny_config, tiny_model

EXACT_RULES = {"attention": "exact", "layer_norm": "exact", "activation": "exact"}


def rel_err(got, want) -> float:
    """‖got − want‖ / ‖want‖, in float64 (numbers: |got / want − 1|)."""
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    return ((got - want).norm() / want.norm()).item()


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def traced_tiny(family: str, dtype=torch.float64, length: int = 16, batch: int = 2):
    """(model, traced graph, ids, train mask, label mask): a tiny model and a seeded input, for the oracles."""
    model = tiny_model(family, dtype=dtype)
    graph = trace(model)
    return (model, graph, *example_input(graph.attrs["vocab"], length, batch, seed=1))


def compile_tiny(family: str, dtype: str = "float64", *, table: dict = TINY, overrides: dict | None = None,
                 seed: int = 0, **tint):
    """(cfg, model, compiled) for table[family] updated by `overrides` (given to the config and the
    model alike); `tint` sets keys of the config's tint section as tests.models.tiny_config does."""
    table = {family: {**table[family], **(overrides or {})}}
    cfg = tiny_config(family, table=table, dtype=dtype, **tint)
    model = tiny_model(family, dtype=cfg.torch_dtype, seed=seed, table=table)
    return cfg, model, pipeline.compile_tint(cfg, model)


@dataclass
class Round:
    """One input through the TinT and through the reference (ĝ or exact GD) it must equal."""

    cfg: object
    model: object
    compiled: object
    ids: torch.Tensor
    train: torch.Tensor
    labels: torch.Tensor | None
    params: dict
    reference: object  # tintc.oracle.reference.GDResult
    logits: torch.Tensor
    decoded: dict  # θ after the steps, decoded from the TinT's new prefixes


def run_round(cfg, model, compiled, against: str = "g_hat", length: int = 16, batch: int = 2,
              lr: float | None = None) -> Round:
    """Run the compiled TinT and the reference on a seeded input (a label mask for label_only), both at
    learning rate `lr` (None: the config's; the TinT takes η as an input)."""
    ids, train, labels = example_input(model.config.vocab_size, length, batch, seed=1)
    labels = labels if cfg.tint.train.loss == "label_only" else None
    params = params_of(model)
    settings = TrainSettings.from_config(cfg, compiled.graph.attrs["n_layer"])
    settings = settings if lr is None else replace(settings, lr=lr)
    if against == "exact":  # autograd through the HF model
        reference = exact_gd(model, compiled.graph, ids, train, settings, labels)
    else:
        reference = approx_gd(compiled.graph, params, ids, train, settings, labels)
    with torch.no_grad():
        logits, prefixes = compiled.tint(ids, train, compiled.tint.encode(params), labels, lr=lr)
    return Round(cfg, model, compiled, ids, train, labels, params, reference, logits, compiled.tint.decode(prefixes))


def tint_round(family: str, dtype: str = "float64", *, against: str = "g_hat", length: int = 16, batch: int = 2,
               table: dict = TINY, overrides: dict | None = None, seed: int = 0, **tint) -> Round:
    """compile_tiny, then run_round."""
    return run_round(*compile_tiny(family, dtype, table=table, overrides=overrides, seed=seed, **tint),
                     against=against, length=length, batch=batch)


def check_round(r: Round, tolerance: float, moved_at_least: float = 1e-3) -> None:
    """The steps changed the model; the TinT's logits, its logit change and every decoded update equal
    the reference's to `tolerance` (relative); the parameters not trained come back bit for bit."""
    ref = r.reference
    assert ref.trained
    assert rel_err(ref.logits, ref.logits_before) > moved_at_least
    assert rel_err(r.logits, ref.logits) <= tolerance
    assert rel_err(r.logits - ref.logits_before, ref.logits - ref.logits_before) <= tolerance
    decoded = r.decoded
    assert decoded.keys() == r.params.keys()
    for name in ref.trained:
        update, got = ref.params[name] - r.params[name], decoded[name] - r.params[name]
        if update.abs().max() < 1e-15:  # k's bias without rotary: softmax ignores a shift of a whole score row
            assert got.abs().max() < 1e-15, name
        else:
            assert rel_err(got, update) <= tolerance, name
    for name in set(r.params) - set(ref.trained):
        assert torch.equal(decoded[name], r.params[name].expand_as(decoded[name])), name


class OpLog(TorchDispatchMode):
    """Under `with OpLog() as log:`, the aten ops that ran (`seen`, by name) and the tensor elements they
    read (`elements`): a count of work that does not depend on the machine's speed."""

    def __init__(self):
        super().__init__()
        self.seen, self.elements = set(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.overloadpacket.__name__)
        self.elements += sum(a.numel() for a in tree_leaves((args, kwargs))
                             if isinstance(a, torch.Tensor))
        return func(*args, **(kwargs or {}))
