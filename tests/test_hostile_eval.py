"""The eval, verify, reference and bench commands against hostile or careless input (issue 25):
every bad number, text, tokenizer or output location is refused by name (exit 2, before any
compile), nothing silently falls back, no NaN is printed or written."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from ir.errors import ConfigError, OutputError, TintcError
from tintc import options
from tintc.eval import run as protocol
from tintc.eval import text_source
from tintc.files import write_files
from tintc.finite import require_finite
from tests.models import TINY, tiny_config, tiny_model

V = TINY["gpt2"]["vocab_size"]
BASE = {"model": {"family": "gpt2", "config": dict(TINY["gpt2"])}, "tint": {"prefixes": 8, "max_length": 16}}
PROSE = "The quick brown fox jumps over the lazy dog; a compiler turns one program into another. " * 4


def _cli(args, capsys, monkeypatch):
    from tintc import cli

    monkeypatch.setattr(sys, "argv", ["tintc", *map(str, args)])
    monkeypatch.setattr(cli, "DEBUG", False)
    with pytest.raises(SystemExit) as done:
        cli.main()
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps({**BASE, "output": "out"}))
    (tmp_path / "prose.txt").write_text(PROSE)
    (tmp_path / "empty.txt").write_text(" \n")
    return path


# Each case: the command line, and the message it must give (exit 2, no traceback, no compile).
CASES = {
    "eval --lrs inf": (["eval", "{yaml}", "--lrs", "inf"],
                       "--lrs: got inf; allowed: a finite number > 0, at most 1000 (as tint.train.lr in the config)"),
    "eval --lrs nan": (["eval", "{yaml}", "--lrs", "1e-3,nan"], "--lrs: got nan; allowed: a finite number > 0"),
    "eval --lrs, two spellings of one lr": (["eval", "{yaml}", "--lrs", "1e-3,0.001"],
                                            "--lrs: got '1e-3,0.001'; allowed: distinct learning rates"),
    "eval --lrs x": (["eval", "{yaml}", "--lrs", "x"], "--lrs: got 'x'; allowed: comma-separated numbers"),
    "eval --train-fraction nan": (["eval", "{yaml}", "--train-fraction", "nan"],
                                  "--train-fraction: got nan; allowed: a number strictly between 0 and 1"),
    "eval --train-fraction 1": (["eval", "{yaml}", "--train-fraction", "1"], "--train-fraction: got 1.0"),
    "eval --seed beyond 64 bits": (["eval", "{yaml}", "--seed", str(2**64)],
                                   f"--seed: got {2**64}; allowed: an integer from 0 to 4294967295 (as model.seed"),
    "eval --seed -1": (["eval", "{yaml}", "--seed", "-1"], "--seed: got -1"),
    "eval --length -4": (["eval", "{yaml}", "--length", "-4"], "--length: got -4; allowed: an integer from 2 to 4096"),
    "eval --length 0": (["eval", "{yaml}", "--length", "0"], "--length: got 0; allowed: an integer from 2 to 4096"),
    "eval --chunks -1": (["eval", "{yaml}", "--chunks", "-1"], "--chunks: got -1; allowed: 0 (every chunk)"),
    "eval an empty --text": (["eval", "{yaml}", "--text", "{tmp}/empty.txt"],
                             "empty.txt, which holds no text (2 characters, all blank)"),
    "verify --length 2": (["verify", "{yaml}", "--length", "2"],
                          "--length: got 2; allowed: an integer from 4 to 4096 (half of it is trained on"),
    "reference --length 1": (["reference", "{yaml}", "--length", "1"], "--length: got 1; allowed: an integer from 4"),
    "reference --length -3": (["reference", "{yaml}", "--length", "-3"], "--length: got -3; allowed: an integer"),
    "reference --length 65": (["reference", "{yaml}", "--length", "65"],
                              "--length: got 65; allowed: an integer from 4 to 32, the aux model's positions"),
    "reference an empty --text": (["reference", "{yaml}", "--text", "{tmp}/empty.txt"], "which holds no text"),
    "bench --lengths 100000": (["bench", "{yaml}", "--lengths", "64,100000"],
                               "--lengths: got 100000; allowed: an integer from 2 to 4096"),
    "bench --lengths, 17 of them": (["bench", "{yaml}", "--lengths", ",".join(str(n) for n in range(2, 19))],
                                    "--lengths: got 17 lengths; allowed: at most 16"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_option_is_refused_by_name_before_any_compile(tmp_path, tiny_yaml, capsys, monkeypatch, case):
    from tintc import pipeline

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before refusing")

    monkeypatch.setattr(pipeline, "compile_tint", no_compile)
    args, message = CASES[case]
    code, _, err = _cli([a.format(yaml=tiny_yaml, tmp=tmp_path) for a in args], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err
    assert message in " ".join(err.split()), err  # rich wraps long lines
    assert not (tmp_path / "out").exists()


def test_two_learning_rates_never_share_a_key():
    near = math.nextafter(1e-3, 1)
    assert options.lr_name(1e-3) == "0.001"  # the usual spelling stays as it was
    assert options.lr_name(near) == repr(near) != options.lr_name(1e-3)
    assert options.eval_numbers(None, None, None, None, f"1e-3,{near!r}") == (1e-3, near)


# -- tokenizers: used, or refused by file; never a silent fallback to bytes --------------------

def _model_dir(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "model"
    tiny_model("gpt2").save_pretrained(folder)
    words = {w: i for i, w in enumerate(["[UNK]", *sorted(set(PROSE.replace(";", " ").replace(".", " ").split()))])}
    tokenizer = Tokenizer(WordLevel(words, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(folder)
    return folder


def test_a_model_folders_tokenizer_is_used_and_named(tmp_path):
    folder = _model_dir(tmp_path)
    tokens = text_source.tokenize(text_source.Text("quick fox", "t"), folder, V)
    assert tokens.ids.tolist() == [text_source.Encoder(folder, V).tokenizer.convert_tokens_to_ids(w)
                                   for w in ("quick", "fox")]
    assert tokens.tokenizer.endswith(f" of {folder}") and not tokens.tokenizer.startswith("no tokenizer")


TOKENIZER_DAMAGE = {
    "a corrupt tokenizer.json": ("tokenizer.json", lambda path: path.write_text('{"version": '),
                                 "tokenizer.json: got a tokenizer file that is not readable JSON"),
    "a tokenizer.json that is not a tokenizer": ("tokenizer.json", lambda path: path.write_text("[1, 2]"),
                                                 "its tokenizer (tokenizer.json, tokenizer_config.json) cannot be "
                                                 "loaded"),
    "a tokenizer_config.json that is not UTF-8": ("tokenizer_config.json", lambda path: path.write_bytes(b"\xff{"),
                                                  "tokenizer_config.json: got a tokenizer file that is not readable"),
    "tokenizer.json missing beside its config": ("tokenizer.json", lambda path: path.unlink(),
                                                 "its tokenizer (tokenizer_config.json) cannot be loaded"),
}


@pytest.mark.parametrize("case", TOKENIZER_DAMAGE)
def test_a_broken_tokenizer_is_refused_naming_its_file(tmp_path, case):
    folder = _model_dir(tmp_path)
    name, damage, message = TOKENIZER_DAMAGE[case]
    damage(folder / name)
    with pytest.raises(ConfigError, match="model.path: ") as info:
        text_source.tokenize(text_source.Text(PROSE, "t"), folder, V)
    assert message in str(info.value)


def test_bytes_are_the_tokens_only_where_the_folder_has_no_tokenizer(tmp_path):
    folder = tmp_path / "model"
    tiny_model("gpt2").save_pretrained(folder)
    tokens = text_source.tokenize(text_source.Text("ab", "t"), folder, V)
    assert tokens.ids.tolist() == [ord("a") % V, ord("b") % V]
    assert tokens.tokenizer == f"no tokenizer: UTF-8 bytes modulo the vocabulary ({V})"


def test_a_tokenizer_of_a_larger_vocabulary_is_refused(tmp_path):
    folder = _model_dir(tmp_path)
    with pytest.raises(ConfigError, match=r"gave token id \d+; allowed: ids below the model's vocabulary size 4"):
        text_source.tokenize(text_source.Text(PROSE, "t"), folder, 4)


def test_reference_with_a_broken_tokenizer_exits_2_naming_the_file(tmp_path, capsys, monkeypatch):
    folder = _model_dir(tmp_path)
    (folder / "tokenizer.json").write_text("{")
    config = tmp_path / "m.yaml"
    config.write_text(json.dumps({"model": {"family": "gpt2", "path": str(folder)}, "tint": {"prefixes": 8}}))
    (tmp_path / "prose.txt").write_text(PROSE)
    code, _, err = _cli(["reference", config, "--text", tmp_path / "prose.txt"], capsys, monkeypatch)
    assert code == 2 and "tokenizer.json: got a tokenizer file that is not readable JSON" in " ".join(err.split())


def test_a_dataset_with_a_row_that_is_not_text_is_refused(tmp_path, monkeypatch):
    class Dataset:  # the few members of datasets.Dataset that dataset_text reads
        column_names = ["text"]

        def __len__(self):
            return 3

        def __getitem__(self, column):
            return ["a", None, "b"]

    fake = types.SimpleNamespace(load_from_disk=lambda path: Dataset(), DatasetDict=dict)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(ConfigError, match="row 1 of 'text': got None; allowed: a string in every row"):
        text_source.dataset_text(tmp_path)


# -- results are finite or refused --------------------------------------------------------------

def test_a_nan_in_any_row_stops_eval_naming_chunk_and_row(tmp_path, monkeypatch):
    real = protocol.Rows.logits

    def nan_for_the_tint(self, row, lr, ids, train, labels=None):
        logits = real(self, row, lr, ids, train, labels)
        return logits * float("nan") if row == protocol.TINT else logits

    monkeypatch.setattr(protocol.Rows, "logits", nan_for_the_tint)
    (tmp_path / "prose.txt").write_text(PROSE)
    settings = protocol.EvalSettings(length=16, chunks=2, seed=1)
    with pytest.raises(TintcError, match=r"chunk 1/\d+ \(tokens \d+\+\): the TinT row, lr 0.05 gave non-finite "
                                         r"logits \(NaN or inf\)"):
        protocol.evaluate(tiny_config("gpt2", prefixes=8), text_source.file_text(tmp_path / "prose.txt"), settings,
                          tmp_path / "eval")
    assert not (tmp_path / "eval" / "eval.json").exists()


def test_require_finite_names_the_quantity():
    table = {"construction": {"logits_rel": 0.1, "delta_cosine": float("nan")}, "approximation": {"x": 1.0}}
    with pytest.raises(TintcError, match=r"verify error: construction.delta_cosine = nan: not a finite number"):
        require_finite(table, "verify")
    assert require_finite({"a": [1.0, (2, 3)]}, "verify") == {"a": [1.0, (2, 3)]}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_json_outputs_are_strict(tmp_path, value):
    with pytest.raises(OutputError, match="eval.json: would hold non-strict JSON"):
        write_files(tmp_path / "out", {"eval.json": json.dumps({"ppl": value})})
    assert not (tmp_path / "out").exists()


# -- output locations: checked before the first compile, links resolved whole -------------------

def test_an_existing_foreign_result_is_refused_before_the_first_compile(tmp_path, tiny_yaml, capsys, monkeypatch):
    out = tmp_path / "results"
    out.mkdir()
    (out / "eval.json").write_text("the user's")
    code, _, err = _cli(["eval", tiny_yaml, "--text", tmp_path / "prose.txt", "--out", out], capsys, monkeypatch)
    assert code == 2 and "would overwrite eval.json, which tintc did not write" in " ".join(err.split())
    assert sorted(p.name for p in out.iterdir()) == ["eval.json"] and (out / "eval.json").read_text() == "the user's"


def test_a_foreign_package_file_is_refused_before_the_first_compile(tmp_path):
    (tmp_path / "out" / "tint").mkdir(parents=True)
    (tmp_path / "out" / "tint" / "weights.safetensors").write_text("the user's")
    with pytest.raises(OutputError, match="would overwrite weights.safetensors"):
        protocol.check_outputs(tmp_path / "out")


def test_a_linked_out_is_resolved_whole(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert protocol.check_outputs(tmp_path / "link" / "eval") == real.resolve() / "eval"
    (tmp_path / "file").write_text("x")
    (tmp_path / "to-file").symlink_to(tmp_path / "file")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        protocol.check_outputs(tmp_path / "to-file")


# -- the emitted package: ids, prefixes, weights header, standard view size --------------------

@pytest.fixture(scope="module")
def package(tmp_path_factory):
    from backends.torch.emit import import_package
    from tintc import pipeline

    cfg = tiny_config("gpt2", prefixes=8)
    model = tiny_model("gpt2")
    out = tmp_path_factory.mktemp("package") / "tint"
    compiled = pipeline.compile_tint(cfg, model)
    pipeline.emit(compiled, cfg, out)
    module = import_package(out, "tint_model_hostile_eval")
    tint = module.load(out)
    return module, tint, tint.encode({n: p.detach() for n, p in model.named_parameters()}), out, compiled.tint


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.int8])
def test_ids_of_a_dtype_an_embedding_does_not_take_are_refused(package, dtype):
    _, tint, prefixes, _, _ = package
    ids = torch.ones(1, 8, dtype=dtype)
    with pytest.raises(TypeError, match=f"input_ids: got a {dtype} tensor of shape \\[1, 8\\]; allowed: an int64 "
                                        "or int32 tensor"):
        tint(ids, torch.ones(1, 8, dtype=torch.bool), prefixes)


def test_int32_ids_give_the_int64_logits(package):
    _, tint, prefixes, _, _ = package
    ids, train = torch.arange(8)[None] % V, torch.arange(8)[None] < 4
    with torch.no_grad():
        assert torch.equal(tint(ids.int(), train, prefixes)[0], tint(ids, train, prefixes)[0])


def test_float16_prefixes_are_refused(package):
    _, tint, prefixes, _, _ = package
    half = {k: v.half() if k != "tint_layout" else v for k, v in prefixes.items()}
    with pytest.raises(TypeError, match="got a torch.float16 tensor .*; allowed: a float32, float64 or bfloat16 "
                                        "tensor"):
        tint(torch.ones(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.bool), half)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_prefixes_of_another_dtype_than_the_tints_are_refused_and_encode_makes_its_own(package, dtype):
    """A float32 TinT given bfloat16 or float64 prefixes is refused at the boundary (not deep inside a
    product), and its encode() casts θ of any floating dtype to float32."""
    _, tint, prefixes, _, _ = package
    other = {k: v.to(dtype) if k != "tint_layout" else v for k, v in prefixes.items()}
    with pytest.raises(TypeError, match=f"got dtype {dtype}; allowed: torch.float32, the dtype of this TinT's "
                                        "weights \\(its encode\\(\\) casts θ to it"):
        tint(torch.ones(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.bool), other)
    theta = {k: v.to(dtype) for k, v in tint.decode(prefixes).items()}
    assert {t.dtype for k, t in tint.encode(theta).items() if k != "tint_layout"} == {torch.float32}


def _header(header: bytes, data: bytes = b"") -> bytes:
    return len(header).to_bytes(8, "little") + header + data


HEADERS = {
    "too short": (b"\x01\x02", "got 2 bytes, too few for a header"),
    "a size past the end": ((10**12).to_bytes(8, "little") + b"{}", "got a header size of 1000000000000 bytes"),
    "not JSON": (_header(b"{nope"), "got a header that is not JSON (JSONDecodeError"),
    "nested past the recursion limit": (_header(b"[" * 100_000 + b"]" * 100_000),
                                        "got a header that is not JSON (RecursionError"),
    "a list": (_header(b"[1, 2]"), "got a header that is not a mapping of tensor names to entries"),
    "2M entries": (_header(b"{" + b",".join(b'"t%d":{}' % i for i in range(2_000_000)) + b"}"),
                   "got a header of about 2000001 entries; the limit is 262144"),
    "metadata that is not text": (_header(b'{"__metadata__": {"a": 1}}'), "got __metadata__ values that are not"),
    "a package record that is not JSON": (_header(b'{"__metadata__": {"tintc_package": "{"}}'),
                                          "got a tintc_package record that is not JSON"),
}


@pytest.mark.parametrize("case", HEADERS)
def test_a_malformed_weights_header_is_refused_naming_the_file(package, case):
    module, _, _, out, _ = package
    data, message = HEADERS[case]
    (out / "weights.safetensors").chmod(0o644)
    original = (out / "weights.safetensors").read_bytes()
    try:
        (out / "weights.safetensors").write_bytes(data)
        with pytest.raises(ValueError) as info:
            module.load(out)
    finally:
        (out / "weights.safetensors").write_bytes(original)
    assert str(info.value).startswith("weights.safetensors: ") and message in str(info.value)


def test_the_standard_view_past_its_budget_is_refused_with_both_sizes(package, monkeypatch):
    from backends.torch import checks
    from backends.torch.program import program_json
    from backends.torch.standard_plan import plan

    tint = package[4]  # the in-memory TinT: its primitives are backends.torch.runtime's
    stream = plan(program_json(tint.program), tint.layers)
    size = sum(b.dense_parameters(stream.d_sim, stream.one) for b in stream.blocks) * 8
    assert checks.within_view_budget(stream, torch.float64, False, budget=size) is stream
    monkeypatch.setattr(checks, "memory_bytes", lambda: 2 * size - 2)  # a budget of half: size - 1 bytes
    with pytest.raises(MemoryError, match=f"standard\\(\\): the standard view would hold {size // 8:,} dense "
                                          "torch.float64 parameters .*; allowed: at most the budget of"):
        tint.standard(torch.float64)


def test_the_plan_estimate_is_the_size_of_the_dense_matrices_and_guards_the_dense_counts(package):
    from backends.torch.primitives import projections
    from backends.torch.view_budget import check_plan_budget, plan_bytes
    from ir.errors import BackendError

    tint = package[4]
    made = [p.dense() for layer in tint.layers.values() for p in projections(layer).values() if p is not None]
    size = sum(m.numel() * m.element_size() for m in made)
    assert plan_bytes(tint.layers) == size
    check_plan_budget(tint.layers, budget=size)
    with pytest.raises(BackendError, match=f"would hold {size / 2**30:.1f} GiB of dense projections; allowed: at "
                                           "most the budget of"):
        check_plan_budget(tint.layers, budget=size - 1)


def test_classify_counts_lines_at_newlines_only_and_refuses_an_empty_query(tmp_path):
    from tintc.config import parse_config
    from tintc.eval.classify import Prompter, read_examples

    cfg = parse_config(json.dumps({**BASE, "eval": {"classify": {"template": "{text}", "shots": 1,
                                                                 "labels": {"pos": "+", "neg": "-"}}}}))
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a\u2028b", "label": "pos"}\n{"text": "", "label": "neg"}\n', encoding="utf-8")
    examples = read_examples(data, cfg.eval.classify)  # U+2028 inside a JSON string ends no line
    assert [(e.text, e.line) for e in examples] == [("a\u2028b", 1), ("", 2)]
    with pytest.raises(ConfigError, match=r"--data: line 2: got a query whose prompt has no tokens \(''"):
        Prompter(cfg, cfg.eval.classify, V).build([examples[0]], examples[1])
