"""Shared steps of the tests of the newer families (tests/test_family_*.py): a tiny random model
saved with `save_pretrained` and compiled from that folder, and one run of its TinT beside an oracle."""

from __future__ import annotations

import json

import torch

from tintc import pipeline
from tintc.config import parse_config
from tintc.oracle.fidelity import example_input
from tintc.oracle.reference import EXACT, TrainSettings, approx_gd, exact_gd
from tests.helpers import EXACT_RULES, rel_err as rel  # noqa: F401  (the family tests import them from here)
from tests.models import TINY, paper_rules, tiny_config, tiny_model


def compiled_from_folder(family: str, folder, dtype: str, kinds: list[str], approximations: dict):
    """A tiny random model of `family` (tests/models.py), saved with save_pretrained under `folder`
    and compiled from there: (config, Compiled). `approximations` as tiny_config takes it: over the paper's rules."""
    tiny_model(family, dtype=torch.float64).save_pretrained(folder / family)
    section = {"prefixes": 8, "max_length": 32, "dtype": dtype, "train": {"lr": 0.05, "kinds": kinds},
               "approximations": paper_rules(approximations)}
    cfg = parse_config(json.dumps({"model": {"family": family, "path": family}, "tint": section}), base_dir=folder)
    return cfg, pipeline.compile_tint(cfg)


def example(family: str):
    """The fixed input of these tests: (ids, train mask), 2 sequences of 16 tokens."""
    ids, train, _ = example_input(TINY[family]["vocab_size"], 16, 2, seed=1)
    return ids, train


def run(cfg, compiled, oracle: str):
    """(reference run, TinT logits, decoded weights, θ) on the fixed input; `oracle`: "exact"
    (autograd through the HF model) or "g_hat" (the interpreter with the config's rules)."""
    model = compiled.model
    ids, train = example(cfg.model.family)
    params = {n: p.detach() for n, p in model.named_parameters()}
    settings = TrainSettings.from_config(cfg, compiled.graph.attrs["n_layer"])
    if oracle == "exact":
        reference = exact_gd(model, compiled.graph, ids, train, settings)
    else:
        reference = approx_gd(compiled.graph, params, ids, train, settings)
    with torch.no_grad():
        logits, prefixes = compiled.tint(ids, train, compiled.tint.encode(params))
    return reference, logits, compiled.tint.decode(prefixes), params


def tint_agrees(reference, logits, decoded, params, bound: float):
    """The TinT's logit change and every decoded update within `bound` (relative) of the reference run's
    (θ `params` before the step)."""
    assert rel(logits - reference.logits_before, reference.logits - reference.logits_before) <= bound
    for name in reference.trained:
        assert rel(decoded[name] - params[name], reference.params[name] - params[name]) <= bound, name


def float32_errors(cfg, compiled):
    """As `tintc verify` shows them: (TinT in float32 vs ĝ in float64, the floor: ĝ in float32 vs ĝ in
    float64), each a dict of errors (delta_rel_err: the logit change; worst_update_rel)."""
    result = pipeline.verify(cfg, compiled, *example(cfg.model.family))
    return result.construction_vs_float64, result.rounding


def oracles_agree(family: str, kinds, bound: float = 1e-10):
    """The two oracles on the tiny fp64 model: autograd through the HF model and the IR interpreter, every
    rule exact and `kinds` trained; the logit change and every update agree to `bound`. The exact run."""
    model = tiny_model(family, dtype=torch.float64)
    graph = pipeline.trace(tiny_config(family, dtype="float64"), model)
    ids, train = example(family)
    params = {n: p.detach() for n, p in model.named_parameters()}
    settings = TrainSettings(lr=0.05, kinds=tuple(kinds), approximations=EXACT)
    exact, approx = exact_gd(model, graph, ids, train, settings), approx_gd(graph, params, ids, train, settings)
    assert rel(exact.logits, exact.logits_before) > 1e-2
    tint_agrees(exact, approx.logits, approx.params, params, bound)  # the interpreter in the TinT's place
    return exact
