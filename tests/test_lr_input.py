"""η as an input of the TinT (issue 24, item 6): the input layer writes the learning rate at every
token and the descents multiply it in, so the TinT's weights do not depend on it and one compile
serves every learning rate. Each η is checked against the oracles run at that η: ĝ in fp64 (≤1e-9),
exact GD with every rule exact (ours, and Hugging Face's own autograd: ≤1e-11), fp32 at its floor."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from backends.torch.checks import weights_digest
from backends.torch.emit import import_package, package_files
from tintc import pipeline
from tintc.oracle.fidelity import example_input
from tintc.oracle.reference import TrainSettings, approx_gd, exact_gd
from tests.helpers import EXACT_RULES, check_round, compile_tiny, params_of, rel_err, run_round
from tests.models import MICRO, tiny_config, tiny_model
from tests.test_exact_hf import BAR, hf_in_float64
from tests.test_tint import KINDS, VARIANTS

LRS = (0.01, 0.05, 0.2)  # the tiny configs' own lr (tests/models.py) is 0.05: one below it, one above


def _compiled(variant, every_kind=False, **tint):
    family, overrides = VARIANTS[variant]
    kinds = (["attn_q", "attn_k"] if every_kind else []) + KINDS[family]
    return compile_tiny(family, overrides=overrides, kinds=kinds, **tint)


@pytest.mark.parametrize("variant,steps,layers,loss", [
    ("gpt2", 1, "all", "context"), ("gpt2", 2, "top-1", "label_only"), ("opt", 2, "all", "context"),
    ("llama", 1, "all", "context"), ("llama", 2, "all", "label_only"), ("neox-parallel", 2, "all", "context")])
def test_one_tint_equals_g_hat_at_every_learning_rate(variant, steps, layers, loss):
    """One compile, η given to forward: logits, logit change and every decoded update (norm gains and
    biases included) equal ĝ run at that η."""
    cfg, model, compiled = _compiled(variant, steps=steps, layers=layers, loss=loss)
    assert cfg.tint.train.lr == 0.05
    for lr in LRS:
        check_round(run_round(cfg, model, compiled, lr=lr), 1e-9, moved_at_least=1e-4)


@pytest.mark.parametrize("variant,steps", [("gpt2", 2), ("llama", 2), ("qwen2", 1)])
def test_with_every_rule_exact_one_tint_is_exact_gd_at_every_learning_rate(variant, steps):
    cfg, model, compiled = _compiled(variant, every_kind=True, steps=steps, approximations=EXACT_RULES)
    for lr in LRS:
        check_round(run_round(cfg, model, compiled, against="exact", lr=lr), 1e-9)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_with_every_rule_exact_one_tint_is_hf_autograd_at_every_learning_rate(family):
    """test_exact_hf's check (HF's own code without its float32 casts, every kind the model has) at
    learning rates other than the compiled one."""
    cfg, model, compiled = _compiled(family, every_kind=True, approximations=EXACT_RULES)
    ids, train, _ = example_input(model.config.vocab_size, 16, 2, seed=1)
    params = params_of(model)
    prefixes = compiled.tint.encode(params)
    model.set_attn_implementation("eager")
    for lr in (0.01, 0.2):
        with torch.no_grad():
            logits, new_prefixes = compiled.tint(ids, train, prefixes, lr=lr)
        with hf_in_float64(model):
            settings = replace(TrainSettings.from_config(cfg, 2), lr=lr)
            hf = exact_gd(model, compiled.graph, ids, train, settings, norms_as_graph=False)
        assert rel_err(hf.logits, hf.logits_before) > 1e-6
        assert rel_err(logits - hf.logits_before, hf.logits - hf.logits_before) <= BAR
        decoded = compiled.tint.decode(new_prefixes)
        for name in hf.trained:
            assert rel_err(decoded[name] - params[name], hf.params[name] - params[name]) <= BAR, (lr, name)


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_the_float32_tint_at_another_learning_rate_is_at_float_precision(variant):
    """As test_tint's fp32 check, at η = 0.2 (4× the compiled one): the TinT's logit change against exact
    GD in fp64 is within 3× the floor (exact GD itself in fp32) and within 1e-5."""
    lr = 0.2
    runs = {}
    for dtype in ("float64", "float32"):
        cfg, model, compiled = _compiled(variant, dtype=dtype, every_kind=True, approximations=EXACT_RULES)
        runs[dtype] = run_round(cfg, model, compiled, against="exact", lr=lr)
    reference = runs["float64"].reference
    change = lambda logits: logits.double() - reference.logits_before  # noqa: E731
    floor = rel_err(change(runs["float32"].reference.logits), change(reference.logits))
    tint = rel_err(change(runs["float32"].logits), change(reference.logits))
    assert 0 < floor < 1e-6 and tint <= 1e-5 and tint <= 3 * floor


def test_the_weights_do_not_depend_on_the_learning_rate(tmp_path):
    """Two configs that differ only in tint.train.lr: the same primitives bit for bit, and the same tensors
    in weights.safetensors (its metadata records the package digest, which covers tint_config.json's
    default lr)."""
    family = "gpt2"
    tints, files = [], []
    for lr in (0.05, 3e-4):
        cfg = tiny_config(family, dtype="float64", kinds=KINDS[family], steps=2, lr=lr)
        assert cfg.tint.train.lr == lr
        tint = pipeline.compile_tint(cfg, tiny_model(family, dtype=torch.float64)).tint
        tints.append(tint)
        files.append(package_files(tint, cfg, "test"))
    first, second = (t.state_dict() for t in tints)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert weights_digest(files[0]["weights.safetensors"])[0] == weights_digest(files[1]["weights.safetensors"])[0]
    assert [t.program.lr for t in tints] == [0.05, 3e-4]


def test_one_learning_rate_per_sequence_and_zero():
    """η as a [B] tensor trains each sequence at its own rate (as a run at that η alone), and η = 0 leaves θ
    as it is: the logits are the untrained model's."""
    cfg, model, compiled = _compiled("llama")
    tint = compiled.tint
    ids, train, _ = example_input(model.config.vocab_size, 16, 2, seed=1)
    params = params_of(model)
    prefixes = tint.encode(params)
    with torch.no_grad():
        both, both_prefixes = tint(ids, train, prefixes, lr=torch.tensor([0.01, 0.2], dtype=torch.float64))
        for i, lr in enumerate((0.01, 0.2)):
            alone, alone_prefixes = tint(ids[i : i + 1], train[i : i + 1], prefixes, lr=lr)
            assert rel_err(both[i], alone[0]) <= 1e-12
        zero, zero_prefixes = tint(ids, train, prefixes, lr=0.0)
    settings = TrainSettings.from_config(cfg, 2)
    oracle = approx_gd(compiled.graph, params, ids, train, settings)
    assert rel_err(zero, oracle.logits_before) <= 1e-9
    assert all(torch.equal(v, params[k].expand_as(v)) for k, v in tint.decode(zero_prefixes).items())


@pytest.mark.parametrize("lr,error,message", [
    ("0.1", TypeError, "lr: got a str"), (True, TypeError, "lr: got a bool"), (float("nan"), ValueError, "lr: got nan"),
    (torch.tensor([0.1, 0.2, 0.3]), TypeError, "shape [] or [2]"), (torch.tensor(1), TypeError, "float tensor"),
    (torch.tensor([0.1, float("inf")]), ValueError, "finite")])
def test_a_bad_learning_rate_is_refused_naming_lr(lr, error, message):
    cfg, model, compiled = _compiled("gpt2")
    ids, train, _ = example_input(model.config.vocab_size, 8, 2, seed=1)
    with pytest.raises(error, match="^lr: ") as caught:
        compiled.tint(ids, train, compiled.tint.encode(params_of(model)), lr=lr)
    assert message in str(caught.value)


def test_the_package_and_the_standard_view_take_the_learning_rate(tmp_path):
    """The emitted package and the standard view (a micro GPT-2) at η ≠ the compiled one equal the
    in-memory TinT; without lr they run at the config's."""
    cfg = tiny_config("gpt2", table=MICRO, dtype="float64", prefixes=4, max_length=8, kinds=KINDS["gpt2"])
    model = tiny_model("gpt2", dtype=torch.float64, table=MICRO)
    compiled = pipeline.compile_tint(cfg, model)
    pipeline.emit(compiled, cfg, tmp_path / "package")
    package = import_package(tmp_path / "package").load(tmp_path / "package")
    view = compiled.tint.standard()
    ids, train, _ = example_input(model.config.vocab_size, 8, 2, seed=1)
    prefixes = compiled.tint.encode(params_of(model))
    with torch.no_grad():
        for lr in (None, 0.2):
            ours = compiled.tint(ids, train, prefixes, lr=lr)[0]
            assert torch.equal(package(ids, train, prefixes, lr=lr)[0], ours)
            assert rel_err(view(ids, train, prefixes, lr=lr)[0], ours) <= 1e-9
        assert torch.equal(package(ids, train, prefixes)[0], compiled.tint(ids, train, prefixes, lr=cfg.tint.train.lr)[0])
        assert rel_err(compiled.tint(ids, train, prefixes, lr=0.2)[0], compiled.tint(ids, train, prefixes)[0]) > 1e-4


def test_verify_runs_at_the_learning_rate_it_is_given(tmp_path):
    """`tintc verify --lr`: the TinT (compiled at the config's lr) and the oracles at another η."""
    import json

    from typer.testing import CliRunner

    from tintc.cli import app
    from tests.models import TINY

    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({"model": {"family": "gpt2", "config": TINY["gpt2"]},
                                  "tint": {"prefixes": 8, "max_length": 16, "dtype": "float64",
                                           "train": {"lr": 0.05}}, "output": "out"}))
    result = CliRunner().invoke(app, ["verify", str(config), "--lr", "0.2"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "float64, lr 0.2, rules " in result.output  # the title names the η it ran at
    rows = {line.split("│")[1].strip(): float(line.split("│")[2]) for line in result.output.splitlines()
            if line.count("│") > 3 and "e-" in line}
    assert rows["construction: TinT vs ĝ oracle"] <= 1e-9
    cfg = tiny_config("gpt2", dtype="float64", max_length=16)
    compiled = pipeline.compile_tint(cfg, tiny_model("gpt2", dtype=torch.float64))
    at_default, at_other = (pipeline.verify_on(cfg, compiled, lr=lr) for lr in (None, 0.2))
    assert (at_default.lr, at_other.lr) == (0.05, 0.2)
    assert at_other.construction["logits_rel"] <= 1e-9
    assert at_other.approximation["delta_rel_err"] != at_default.approximation["delta_rel_err"]
