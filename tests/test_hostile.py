"""Hostile inputs (issue 13): every bad input is refused with the documented error naming the
culprit; nothing is silently wrong, no data becomes code, and no file outside tintc's outputs
changes. One table per boundary (forward/decode/encode, the package, the config, the output
directory, the command line), then hypothesis tests that only documented errors come out."""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.torch.checks import FINGERPRINT
from backends.torch.emit import _literal, import_package
from tintc import pipeline
from tintc.pipeline import emit
from tintc.config import load_config, parse_config
from ir.errors import ConfigError, FrontendError, OutputError, TintcError
from tintc.oracle.fidelity import example_input
from tintc.files import MANIFEST, write_files
from tests.helpers import OpLog, params_of
from tests.models import TINY, tiny_config, tiny_model

V = TINY["gpt2"]["vocab_size"]


def _package(root: Path, name: str, family="gpt2", **tint):
    cfg = tiny_config(family, **tint)
    model = tiny_model(family, dtype=cfg.torch_dtype)
    out = root / name
    emit(pipeline.compile_tint(cfg, model), cfg, out)
    return import_package(out, f"tint_model_{name}").load(out), model, out


@pytest.fixture(scope="module")
def tints(tmp_path_factory):
    """Emitted packages: tiny gpt2 with K=8 (the one under test), K=16, label-only, and tiny opt."""
    root = tmp_path_factory.mktemp("hostile")
    gpt2, model, out = _package(root, "gpt2")
    return {"gpt2": gpt2, "model": model, "out": out, "root": root,
            "k16": _package(root, "k16", prefixes=16)[0],
            "labels": _package(root, "labels", loss="label_only")[0],
            "opt": _package(root, "opt", family="opt")[0]}


def _good(t):
    """A valid call of the K=8 gpt2 TinT: ids, train mask, prefixes, label mask."""
    ids, train, labels = example_input(V, 16, 2, seed=1)
    return {"input_ids": ids, "train_mask": train, "prefixes": t["gpt2"].encode(params_of(t["model"])),
            "label_mask": None, "labels": labels}


def _edit(**change):
    def apply(t, args):
        for key, fn in change.items():
            args[key] = fn(t, args)
    return apply


def _block(t, args, fn):
    prefixes = dict(args["prefixes"])
    prefixes["h0.q"] = fn(prefixes["h0.q"])
    return prefixes


def _swapped_routing(block):
    """The block's tokens 0 and 1 trade their one-hot positions (its last K coordinates)."""
    block = block.clone()
    k = block.shape[-2]
    block[..., [0, 1], -k:] = block[..., [1, 0], -k:]
    return block


def _scaled_routing(block, token):
    block = block.clone()
    block[..., token, -block.shape[-2] :] *= 2
    return block


# case -> (change to a valid call, error type, text the message must hold)
FORWARD_CASES = {
    "opt-tiny prefixes in the gpt2 TinT": (
        _edit(prefixes=lambda t, a: t["opt"].encode(params_of(tiny_model("opt")))), ValueError, "tint_layout"),
    "K=16 prefixes in the K=8 TinT": (
        _edit(prefixes=lambda t, a: t["k16"].encode(params_of(t["model"]))), ValueError, "tint_layout"),
    "a block cut to half its tokens": (
        _edit(prefixes=lambda t, a: _block(t, a, lambda b: b[: b.shape[0] // 2])), ValueError, "prefixes['h0.q']"),
    "an embedding table with 65 rows": (
        _edit(prefixes=lambda t, a: {**a["prefixes"], "vocab": torch.cat([a["prefixes"]["vocab"]] * 2)[: V + 1]}),
        ValueError, "prefixes['vocab']"),
    "an embedding table with 40 rows": (
        _edit(prefixes=lambda t, a: {**a["prefixes"], "vocab": a["prefixes"]["vocab"][:40]}),
        ValueError, "prefixes['vocab']"),
    "prefixes without the fingerprint (an old dict)": (
        _edit(prefixes=lambda t, a: {k: v for k, v in a["prefixes"].items() if k != FINGERPRINT}),
        ValueError, "tint_layout"),
    "an unembed table given to a tied TinT": (
        _edit(prefixes=lambda t, a: {**a["prefixes"], "unembed": a["prefixes"]["vocab"]}), ValueError, "'unembed'"),
    "a block missing": (
        _edit(prefixes=lambda t, a: {k: v for k, v in a["prefixes"].items() if k != "h0.q"}), ValueError, "'h0.q'"),
    "one block in another dtype": (
        _edit(prefixes=lambda t, a: _block(t, a, lambda b: b.double())), TypeError, "prefixes['h0.q']"),
    "a block's one-hot positions swapped (tokens 0 and 1)": (
        _edit(prefixes=lambda t, a: _block(t, a, lambda b: _swapped_routing(b))), ValueError,
        "prefixes['h0.q']: got coordinates"),
    "a block's one-hot scaled by 2 at token 3": (
        _edit(prefixes=lambda t, a: _block(t, a, lambda b: _scaled_routing(b, 3))), ValueError, "one-hot"),
    "per-sequence prefixes for 3 sequences, batch 2": (
        _edit(prefixes=lambda t, a: _block(t, a, lambda b: b.expand(3, -1, -1))), ValueError, "3"),
    "train_mask value 2": (_edit(train_mask=lambda t, a: a["train_mask"].long() * 2), ValueError, "train_mask"),
    "train_mask value 0.5": (_edit(train_mask=lambda t, a: a["train_mask"] * 0.5), ValueError, "train_mask"),
    "train_mask value -1": (_edit(train_mask=lambda t, a: -a["train_mask"].long()), ValueError, "train_mask"),
    "a [1, 1] train_mask (broadcast)": (
        _edit(train_mask=lambda t, a: torch.ones(1, 1, dtype=torch.bool)), ValueError, "train_mask"),
    "train_mask not a tensor": (_edit(train_mask=lambda t, a: [[1] * 16] * 2), TypeError, "train_mask"),
    "input_ids -1": (_edit(input_ids=lambda t, a: a["input_ids"].index_fill(1, torch.tensor([3]), -1)),
                     ValueError, "input_ids: got id -1"),
    "input_ids = vocab size": (_edit(input_ids=lambda t, a: a["input_ids"].index_fill(1, torch.tensor([3]), V)),
                               ValueError, f"input_ids: got id {V}"),
    "float input_ids": (_edit(input_ids=lambda t, a: a["input_ids"].float()), TypeError, "input_ids"),
    "1-d input_ids": (_edit(input_ids=lambda t, a: a["input_ids"][0]), ValueError, "input_ids"),
    "input longer than max_length": (
        _edit(input_ids=lambda t, a: torch.zeros(1, 33, dtype=torch.long),
              train_mask=lambda t, a: torch.ones(1, 33, dtype=torch.bool)), ValueError, "max_length"),
    "label_mask given to a context-loss TinT": (
        _edit(label_mask=lambda t, a: a["labels"]), ValueError, "label_mask"),
}


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_forward_refuses(tints, case):
    change, error, text = FORWARD_CASES[case]
    args = _good(tints)
    change(tints, args)
    with pytest.raises(error) as info:
        tints["gpt2"](args["input_ids"], args["train_mask"], args["prefixes"], args["label_mask"])
    assert text in str(info.value)


def test_a_label_only_tint_requires_the_label_mask(tints):
    args = _good(tints)
    prefixes = tints["labels"].encode(params_of(tints["model"]))
    with pytest.raises(ValueError, match="label_mask: got None"):
        tints["labels"](args["input_ids"], args["train_mask"], prefixes)
    tints["labels"](args["input_ids"], args["train_mask"], prefixes, args["labels"])  # with it: runs


def test_another_checkpoint_of_the_architecture_runs_and_round_trips(tints):
    """The point of a TinT: prefixes of any checkpoint of its architecture pass every check."""
    args = _good(tints)
    other = params_of(tiny_model("gpt2", seed=7))
    prefixes = tints["gpt2"].encode(other)
    logits, new = tints["gpt2"](args["input_ids"], args["train_mask"].long(), prefixes)  # 0/1 ints are masks
    assert torch.isfinite(logits).all() and logits.shape == (2, 16, V)
    assert new[FINGERPRINT].shape == prefixes[FINGERPRINT].shape
    trained = tints["gpt2"].decode(new)  # forward's output decodes: it carries the fingerprint
    assert trained.keys() == other.keys()


DECODE_ENCODE_CASES = {
    "decode of opt prefixes": (lambda t: t["gpt2"].decode(t["opt"].encode(params_of(tiny_model("opt")))),
                               ValueError, "tint_layout"),
    "decode of a block cut in half": (lambda t: t["gpt2"].decode(_block(t, _good(t), lambda b: b[:4])),
                                      ValueError, "prefixes['h0.q']"),
    "encode of a state dict missing a weight": (
        lambda t: t["gpt2"].encode({k: v for k, v in params_of(t["model"]).items() if "c_fc" not in k}),
        ValueError, "c_fc"),
    "encode of a weight with another shape": (
        lambda t: t["gpt2"].encode({**params_of(t["model"]), "transformer.wte.weight": torch.zeros(V + 1, 32)}),
        ValueError, "state_dict['transformer.wte.weight']"),
    "encode of an opt state dict": (lambda t: t["gpt2"].encode(params_of(tiny_model("opt"))), ValueError, "lacks"),
    "encode of integer weights": (
        lambda t: t["gpt2"].encode({k: v.long() for k, v in params_of(t["model"]).items()}), TypeError, "state_dict["),
}


@pytest.mark.parametrize("case", DECODE_ENCODE_CASES)
def test_decode_and_encode_refuse(tints, case):
    run, error, text = DECODE_ENCODE_CASES[case]
    with pytest.raises(error) as info:
        run(tints)
    assert text in str(info.value)


def test_the_check_costs_well_under_one_percent_of_a_forward(tints):
    """Counted, not timed: the tensor elements the check reads are a few passes over the ids and masks and
    one over each linear block's one-hot positions (K² numbers of a block's K·width; of the rest of the
    prefixes only shapes and dtypes), well under 1% of what the forward reads."""
    from backends.torch.checks import check_inputs

    tint = tints["gpt2"]
    ids = torch.randint(0, V, (1, 32), generator=torch.Generator().manual_seed(0))
    train = torch.zeros(1, 32, dtype=torch.bool)
    train[:, :16] = True
    prefixes = tint.encode(params_of(tints["model"]))
    with torch.no_grad(), OpLog() as forward:
        tint(ids, train, prefixes)
    with OpLog() as check:
        check_inputs(tint.contract, ids, train, None, prefixes)
    # OpLog counts a view's input whole (the slice of a block's one-hot positions: the block once), then a few
    # passes over the K² one-hot numbers
    blocks = sum(prefixes[name].numel() + 4 * prefixes[name].shape[-2] ** 2 for name in tint.contract["routing"])
    assert blocks > 0 and 0 < check.elements <= 4 * (ids.numel() + train.numel()) + blocks
    assert check.elements < 0.01 * forward.elements, (check.elements, forward.elements)


# -- the package: one digest ties code, config and weights ------------------------------------

def _copy_package(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("tint_model.py", "tint_config.json", "weights.safetensors"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _edit_config(path: Path):
    config = json.loads(path.read_text())
    config["calls"][0]["write"][0][0] += 1  # a call's write moved by one coordinate
    path.write_text(json.dumps(config, indent=2))


def _edit_field(path: Path):
    config = json.loads(path.read_text())
    config["inputs"]["train"][0] += 1  # the train mask's field moved by one coordinate
    path.write_text(json.dumps(config, indent=2))


PACKAGE_CASES = {
    "an edited call in tint_config.json": (lambda d, t: _edit_config(d / "tint_config.json"), "tint_config.json"),
    "an edited field start in tint_config.json": (lambda d, t: _edit_field(d / "tint_config.json"), "tint_config.json"),
    "tint_config.json that is not JSON": (
        lambda d, t: (d / "tint_config.json").write_text("{"), "tint_config.json"),
    "weights of another compile (K=16)": (
        lambda d, t: (d / "weights.safetensors").write_bytes((t["root"] / "k16" / "weights.safetensors").read_bytes()),
        "weights.safetensors"),
    "an edited tint_model.py": (
        lambda d, t: (d / "tint_model.py").write_text((d / "tint_model.py").read_text().replace(
            "softmax=True", "softmax=False", 1)), "tint_model.py"),
}


@pytest.mark.parametrize("case", PACKAGE_CASES)
def test_load_refuses_a_package_whose_parts_do_not_match(tints, tmp_path, case):
    edit, culprit = PACKAGE_CASES[case]
    directory = _copy_package(tints["out"], tmp_path / "package")
    import_package(directory, "tint_model_intact").load(directory)  # the copy itself loads
    edit(directory, tints)
    with pytest.raises(ValueError) as info:
        import_package(directory, "tint_model_edited").load(directory)
    assert str(info.value).startswith(culprit)


# -- no code from data --------------------------------------------------------------------------

def test_a_crafted_config_name_stays_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "ran"
    name = 'x"""\nopen("ran", "w")\n"""\\'  # ends the docstring, runs code, escapes the next quote
    cfg = tiny_config("gpt2")
    cfg._source = tmp_path / f"{name}.yaml"
    out = tmp_path / "out"
    emit(pipeline.compile_tint(cfg, tiny_model("gpt2")), cfg, out)
    module = import_package(out, "tint_model_crafted")
    assert not marker.exists()  # importing ran nothing
    assert json.dumps(name) in (out / "tint_model.py").read_text()  # the name as an escaped literal
    assert name in module.__doc__  # which reads back as the name itself


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), 1e-5, 1e300, 0.0])
def test_numbers_are_emitted_so_that_they_load(value):
    assert eval(_literal(value), {}) == value
    assert eval(_literal(float("nan")), {}) != eval(_literal(float("nan")), {})  # nan loads as nan


# -- the config -------------------------------------------------------------------------------

BASE = {"model": {"family": "gpt2", "config": dict(TINY["gpt2"])}, "tint": {"prefixes": 8}}


def _with(path: tuple, value) -> str:
    data = json.loads(json.dumps(BASE))
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return json.dumps(data)


CONFIG_CASES = {
    "lr: .inf": ("tint:\n  train:\n    lr: .inf\n", "tint.train.lr"),
    "lr: 1.0e+30": ("tint:\n  train:\n    lr: 1.0e+30\n", "tint.train.lr: got 1e+30"),
    "lr: .nan": ("tint:\n  train:\n    lr: .nan\n", "tint.train.lr"),
    "scale: .inf": ("tint:\n  approximations:\n    scale: .inf\n", "tint.approximations.scale"),
    "steps: 1000000": (_with(("tint", "train", "steps"), 1000000), "tint.train.steps"),
    "seed: 2**70": (_with(("model", "seed"), 2**70), "model.seed"),
    "vocab_size: 0": (_with(("model", "config", "vocab_size"), 0), "model.config.vocab_size"),
    "n_positions: 1": (_with(("model", "config", "n_positions"), 1), "model.config.n_positions"),
    "layer_norm_epsilon: .inf": ("model:\n  config:\n    layer_norm_epsilon: .inf\n", "layer_norm_epsilon"),
    "max_length: 10**6": (_with(("tint", "max_length"), 10**6), "tint.max_length"),
    "layers: 'top-1\\n'": (_with(("tint", "train", "layers"), "top-1\n"), "tint.train.layers"),
    "an alias": ("a: &x [1]\nb: *x\n", "anchor &x"),
    "a billion-laughs alias bomb": ("".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]\n"
                                            for i in range(1, 12)).replace("[*l0", "[0").replace(", *l0", ", 0"),
                                    "anchor &l1"),
}


def _merge_yaml(extra: str) -> str:
    """BASE with `extra` (YAML of a few keys) deep-merged over it, as one JSON document."""
    import yaml

    if extra.lstrip().startswith("{"):
        return extra
    try:
        override = yaml.safe_load(extra)
    except yaml.YAMLError:
        return extra
    if not isinstance(override, dict) or "a" in override or any(k.startswith("l") for k in override):
        return extra
    data = json.loads(json.dumps(BASE))

    def merge(into, new):
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(into.get(k), dict):
                merge(into[k], v)
            else:
                into[k] = v
    merge(data, override)
    return yaml.safe_dump(data)


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_refuses(tmp_path, case):
    text, culprit = CONFIG_CASES[case]
    path = tmp_path / "model.yaml"
    path.write_text(_merge_yaml(text))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert culprit in str(info.value)


def _hf_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "hf"
    tiny_model("gpt2").save_pretrained(directory)
    return directory


MODEL_PATH_CASES = {
    "garbage config.json": (lambda d: (d / "config.json").write_text("{not json"), ConfigError, "config.json"),
    "a list in config.json": (lambda d: (d / "config.json").write_text("[1, 2]"), ConfigError, "config.json"),
    "no config.json": (lambda d: (d / "config.json").unlink(), ConfigError, "config.json"),
    "truncated weights": (lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:1000]), FrontendError, "model.path"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), FrontendError, "model.path"),
}


@pytest.mark.parametrize("case", MODEL_PATH_CASES)
def test_a_corrupt_model_path_is_a_clear_error(tmp_path, case):
    break_it, error, culprit = MODEL_PATH_CASES[case]
    directory = _hf_dir(tmp_path)
    break_it(directory)
    path = tmp_path / "model.yaml"
    path.write_text(json.dumps({"model": {"family": "gpt2", "path": "hf"}, "tint": {"prefixes": 8}}))
    with pytest.raises(error) as info:
        pipeline.load_aux_model(load_config(path))
    assert culprit in str(info.value)


def test_a_compile_that_would_not_fit_is_refused_before_it_starts(monkeypatch):
    fits = tiny_config("gpt2", table={"gpt2": dict(TINY["gpt2"], n_embd=256, n_head=4)}, steps=1, prefixes=8)
    predicted = pipeline.check_memory(fits, pipeline.aux_config(fits)).total
    monkeypatch.setattr(pipeline, "MEMORY_BUDGET", predicted + 16 * 2**20)  # a small machine
    steps = tiny_config("gpt2", table={"gpt2": dict(TINY["gpt2"], n_embd=256, n_head=4)}, steps=64, prefixes=8)
    traced = []
    monkeypatch.setattr(pipeline, "trace_from_config", lambda *a: traced.append(a))
    with pytest.raises(ConfigError, match=r"tint.train.steps, tint.passes.block_sharing: the compile would need "
                                          r"about [\d.]+ GiB, program [\d.]+ GiB the largest"):
        pipeline.compile_tint(steps)  # each step's calls carry their own wiring
    assert not traced  # refused before the work started


def test_a_config_that_is_not_utf8(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_bytes(b"model:\n  family: gpt2\xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


# -- the output directory ---------------------------------------------------------------------

def _snapshot(root: Path) -> dict:
    """Every path under root (links not followed) with its content: what a write must not change."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.name.endswith(".tintc-lock"):
            continue  # tintc's own lock file beside the output
        if path.is_symlink():
            found[str(path)] = ("link", os.readlink(path))
        elif path.is_file():
            found[str(path)] = ("file", path.read_bytes())
    return found


def _victim(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    return victim


FILE_CASES = {
    # case -> (set up in tmp_path/out; the files written; the names the error must name)
    "the user's own report.md": (lambda t, o: (o / "report.md").write_text("mine"), ["report.md"]),
    "the user's own tint_model.py": (lambda t, o: (o / "tint_model.py").write_text("mine"), ["tint_model.py"]),
    "a symlink planted at an output name": (
        lambda t, o: (o / "tint_model.py").symlink_to(_victim(t)), ["tint_model.py"]),
    "a symlink planted at the old fixed temp name": (
        lambda t, o: (o / ".tint_model.py.tmp").symlink_to(_victim(t)), None),
    "a tintc file edited since": (
        lambda t, o: (write_files(o, {"report.md": "tintc's"}), (o / "report.md").write_text("edited")), ["report.md"]),
}


@pytest.mark.parametrize("case", FILE_CASES)
def test_writes_never_touch_what_tintc_did_not_write(tmp_path, case):
    setup, culprits = FILE_CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    setup(tmp_path, out)
    before = _snapshot(tmp_path)
    files = {"tint_model.py": "new", "report.md": "new"}
    if culprits is None:  # nothing to refuse: the write succeeds and leaves the planted link alone
        write_files(out, files)
        after = _snapshot(tmp_path)
        assert {k: v for k, v in after.items() if k in before} == before
        assert (out / "tint_model.py").read_text() == "new" and not (out / "tint_model.py").is_symlink()
        return
    with pytest.raises(OutputError) as info:
        write_files(out, files)
    assert all(name in str(info.value) for name in culprits)
    assert _snapshot(tmp_path) == before  # refused: nothing changed
    write_files(out, files, force=True)  # --force replaces the entries, never what a link points at
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if "/out/" not in k} == {k: v for k, v in before.items() if "/out/" not in k}
    assert (out / "tint_model.py").read_text() == "new" and not (out / "tint_model.py").is_symlink()


@pytest.mark.parametrize("kind", ["a file", "under a file"])
def test_an_output_path_that_cannot_be_a_directory(tmp_path, kind):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if kind == "a file" else tmp_path / "f" / "out"
    with pytest.raises(OutputError) as info:
        write_files(out, {"a": "b"})
    assert str(out) in str(info.value)
    assert (tmp_path / "f").read_text() == "x"


def test_a_killed_write_leaves_the_old_set_and_the_next_write_cleans_up(tmp_path):
    out = tmp_path / "out"
    write_files(out, {"report.md": "old report", "tint_model.py": "old package"}, source="a")

    def killed(path):
        path.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_files(out, {"tint_model.py": "new package", "report.md": killed}, source="b")
    assert (out / "tint_model.py").read_text() == "old package" and (out / "report.md").read_text() == "old report"
    (tmp_path / ".out.new-leftover").mkdir()  # what a SIGKILL would leave
    write_files(out, {"tint_model.py": "new package"}, source="b")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tintc-lock", "out"]
    # the report came from config "a": stale beside the package of config "b", so it is dropped
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "tint_model.py"]


def test_the_users_other_files_are_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "data").write_text("mine too")
    write_files(out, {"tint_model.py": "a"}, source="a")
    write_files(out, {"tint_model.py": "b"}, source="b")
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "data").read_text() == "mine too"


def test_concurrent_writes_wait_for_each_other_and_give_one_whole_set(tmp_path):
    out = tmp_path / "out"
    inside = threading.Event()
    seen = []  # what a reader saw while the first writer was inside write_files
    errors = []

    def slow(path):
        inside.set()
        seen.append(sorted(p.name for p in out.iterdir()) if out.exists() else [])
        threading.Event().wait(0.3)  # the second writer starts meanwhile and must wait on the lock
        path.write_text("A")

    def writer(files, tag):
        try:
            write_files(out, files, source=tag)
        except Exception as err:  # noqa: BLE001 (asserted below)
            errors.append(err)

    first = threading.Thread(target=writer, args=({"tint_model.py": slow, "report.md": "A"}, "A"))
    first.start()
    inside.wait(10)
    second = threading.Thread(target=writer, args=({"tint_model.py": "B", "report.md": "B"}, "B"))
    second.start()
    first.join()
    second.join()
    assert not errors and seen == [[]]  # nothing visible until the first set was swapped in whole
    assert {(out / n).read_text() for n in ("tint_model.py", "report.md")} == {"B"}  # the second set, whole


def test_identical_compiles_give_identical_bytes_but_timings(tmp_path):
    cfg = tiny_config("gpt2")
    contents = []
    for run in ("a", "b"):
        run_cfg = cfg.model_copy(update={"output": str(tmp_path / run)})
        pipeline.save(pipeline.compile_tint(run_cfg, tiny_model("gpt2")), run_cfg)
        contents.append({p.name: p.read_bytes() for p in (tmp_path / run).iterdir()})
    assert contents[0].keys() == contents[1].keys()
    differ = sorted(name for name in contents[0] if contents[0][name] != contents[1][name])
    assert set(differ) <= {"timings.json", MANIFEST}  # the manifest records the timings' digest
    assert "compile_seconds" in json.loads(contents[0]["timings.json"])
    assert "compile_seconds" not in contents[0]["report.json"].decode()


# -- the command line -------------------------------------------------------------------------

def _cli(args, capsys, monkeypatch):
    from tintc import cli

    monkeypatch.setattr(sys, "argv", ["tintc", *args])
    monkeypatch.setattr(cli, "DEBUG", False)
    with pytest.raises(SystemExit) as done:
        cli.main()
    captured = capsys.readouterr()
    return done.value.code, captured.err


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps({**BASE, "tint": {"prefixes": 8, "max_length": 16}, "output": "out"}))
    return path


CLI_CASES = {
    "verify --length 1000": (["verify", "{yaml}", "--length", "1000"], "--length"),
    "verify --length -3": (["verify", "{yaml}", "--length", "-3"], "--length"),
    "verify --length 1": (["verify", "{yaml}", "--length", "1"], "--length"),
    "verify --batch 0": (["verify", "{yaml}", "--batch", "0"], "--batch"),
    "verify --text missing": (["verify", "{yaml}", "--text", "{tmp}/missing.txt"], "missing.txt"),
    "verify --lr 0": (["verify", "{yaml}", "--lr", "0"], "--lr: got 0.0"),
    "verify --lr nan": (["verify", "{yaml}", "--lr", "nan"], "--lr: got nan"),
    "compile into a file": (["compile", "{tmp}/as-file.yaml"], "exists and is not a directory"),
    "a config that is not UTF-8": (["compile", "{tmp}/latin1.yaml"], "not UTF-8"),
    "a config file that is missing": (["compile", "{tmp}/nope.yaml"], "nope.yaml"),
    "bench --lengths x": (["bench", "{yaml}", "--lengths", "x"], "--lengths"),
}


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_errors_are_red_messages_with_exit_2(tmp_path, tiny_yaml, capsys, monkeypatch, case):
    args, culprit = CLI_CASES[case]
    (tmp_path / "latin1.yaml").write_bytes("model:\n  family: gpt2 é\n".encode("latin-1"))
    (tmp_path / "blocker").write_text("a file")
    (tmp_path / "as-file.yaml").write_text(json.dumps({**BASE, "output": "blocker"}))
    code, err = _cli([a.format(yaml=tiny_yaml, tmp=tmp_path) for a in args], capsys, monkeypatch)
    assert code == 2
    assert culprit in err and "Traceback" not in err
    assert (tmp_path / "blocker").read_text() == "a file"


def test_an_unexpected_error_is_red_without_a_traceback_unless_debug(tiny_yaml, capsys, monkeypatch):
    from tintc import cli

    def broken(*args, **kwargs):
        raise RuntimeError("something broke")

    monkeypatch.setattr(pipeline, "compile_tint", broken)
    code, err = _cli(["compile", str(tiny_yaml)], capsys, monkeypatch)
    assert code == 2 and "RuntimeError: something broke" in err and "Traceback" not in err
    monkeypatch.setattr(sys, "argv", ["tintc", "--debug", "compile", str(tiny_yaml)])
    with pytest.raises(RuntimeError, match="something broke"):
        cli.main()


# -- hypothesis: only the documented errors come out ----------------------------------------------

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


@FAST
@given(st.binary(max_size=300))
def test_random_bytes_give_a_config_or_a_config_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("bytes") / "model.yaml"
    path.write_bytes(data)
    try:
        load_config(path)
    except ConfigError:
        pass


scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**80, 2**80), st.floats(), st.text(max_size=8),
                    st.sampled_from(["gpt2", "opt", "all", "top-1", "context", "label_only", "float32", "exact"]))
keys = st.sampled_from(["model", "tint", "output", "family", "config", "path", "seed", "train", "steps", "lr",
                        "prefixes", "n_embd", "vocab_size", "n_positions", "n_head", "kinds", "layers", "x"])
trees = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(keys, inner, max_size=4)), max_leaves=12)


@FAST
@given(st.dictionaries(keys, trees, max_size=4))
def test_random_yaml_trees_give_a_config_or_a_config_error(tree):
    import yaml

    try:
        parse_config(yaml.safe_dump(tree))
    except ConfigError:
        pass


tensors = st.tuples(
    st.lists(st.integers(0, 40), min_size=0, max_size=3),  # shape
    st.sampled_from([torch.long, torch.int32, torch.float32, torch.bool, torch.uint8]),
    st.integers(-3, V + 3),  # fill value
)


def _make(spec):
    shape, dtype, fill = spec
    if dtype == torch.bool:
        return torch.full(shape, bool(fill % 2), dtype=dtype)
    if dtype == torch.uint8:
        return torch.full(shape, abs(fill), dtype=dtype)
    return torch.full(shape, fill, dtype=dtype)


@FAST
@given(tensors, tensors, st.one_of(st.none(), tensors))
def test_random_tensors_to_forward_give_logits_or_documented_errors(tints, ids, train, labels):
    args = _good(tints)
    try:
        with torch.no_grad():
            logits, _ = tints["gpt2"](_make(ids), _make(train), args["prefixes"], None if labels is None else _make(labels))
    except (TypeError, ValueError):
        return
    assert torch.isfinite(logits).all()
