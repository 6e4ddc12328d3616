"""Property (issue 25): any value of the numeric options of `eval`, `verify`, `reference` and
`bench` ends in exit 0 with finite output, or in exit 2 with a message naming an option it was
given, never a traceback or an unexpected error. The commands run in-process through
`tintc.cli.main` on a tiny GPT-2 and a short text. bench's measurements are a process each
(minutes): its run is replaced by a probe that records what reaches it, and every value that does
must be one bench can measure."""

from __future__ import annotations

import json
import math
import re
import sys

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.models import TINY

CONFIG = {"model": {"family": "gpt2", "config": dict(TINY["gpt2"], n_layer=1)},
          "tint": {"prefixes": 8, "max_length": 16}, "output": "out"}
PROSE = "A compiler turns one program into another. " * 8  # 352 bytes: 22 chunks of 16

integers = st.one_of(st.integers(-5, 40), st.sampled_from([0, 1, 2, 3, 4, 16, 17, 2**31, 2**63, 2**64, -(2**64)]))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, -0.0, 0.1, 0.5, 0.9, 1.0, 1e-300]))
number_lists = st.one_of(
    st.lists(st.one_of(st.floats(min_value=1e-6, max_value=1e4), st.floats(), integers), min_size=1, max_size=2)
    .map(lambda values: ",".join(repr(v) for v in values)),
    st.text(alphabet="0123456789.,-e+naif ", max_size=12))

OPTIONS = {  # command -> option -> strategy of its value
    "verify": {"--length": integers, "--batch": integers},
    "reference": {"--length": integers},
    "eval": {"--length": integers, "--train-fraction": floats, "--chunks": integers, "--seed": integers,
             "--lrs": number_lists},
    "bench": {"--lengths": number_lists, "--repeats": integers},
}


@st.composite
def command_lines(draw):
    command = draw(st.sampled_from(sorted(OPTIONS)))
    names = draw(st.lists(st.sampled_from(sorted(OPTIONS[command])), min_size=1, max_size=2, unique=True))
    return command, {name: draw(OPTIONS[command][name]) for name in names}


# Short runs where a drawn value leaves them so: T=8, one chunk (eval writes into a folder of its own).
DEFAULTS = {"verify": ["--length", "8"], "reference": ["--length", "8"], "bench": [],
            "eval": ["--length", "8", "--chunks", "1", "--text", "{dir}/prose.txt", "--out", "{dir}/eval"]}
COMPILED = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    (root / "tiny.yaml").write_text(json.dumps(CONFIG))
    (root / "prose.txt").write_text(PROSE)
    for command, args in DEFAULTS.items():
        DEFAULTS[command] = [a.format(dir=root) for a in args]
    return root


def _run(args, capsys, monkeypatch) -> tuple[int, str, str]:
    from tintc import cli

    monkeypatch.setattr(sys, "argv", ["tintc", *args])
    monkeypatch.setattr(cli, "DEBUG", False)
    try:
        cli.main()
        code = 0
    except SystemExit as done:
        code = done.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(command_lines())
@example(("eval", {"--seed": 2**64}))  # the cases, always tried (each was a raw error)
@example(("eval", {"--train-fraction": math.nan}))
@example(("eval", {"--lrs": "inf"}))
@example(("reference", {"--length": 65}))
@example(("bench", {"--lengths": "100000"}))
def test_any_option_value_gives_a_finite_result_or_a_named_refusal(workdir, capsys, monkeypatch, line):
    from tintc import bench, pipeline

    compile_tint = pipeline.compile_tint

    def compile_once(cfg, model=None, **kwargs):  # one compile per config for the whole test: the runs stay short
        key = cfg.model_dump_json()
        if key not in COMPILED:
            COMPILED[key] = compile_tint(cfg, model, **kwargs)
        return COMPILED[key]

    monkeypatch.setattr(pipeline, "compile_tint", compile_once)
    reached = []

    def probe(config, lengths, repeats, **kwargs):
        reached.append((lengths, repeats))
        raise SystemExit(0)

    monkeypatch.setattr(bench, "run", probe)
    command, values = line
    args = [command, str(workdir / "tiny.yaml"), *DEFAULTS[command]]  # a drawn value given later wins
    for name, value in values.items():
        args += [name, str(value)]
    code, out, err = _run(args, capsys, monkeypatch)

    assert "Traceback" not in err and "tintc error:" not in err, err  # tintc error: an unexpected exception
    if code == 2:
        assert any(name in err for name in values), (args, err)
        return
    assert code == 0, (args, code, err)
    assert not re.search(r"\b(nan|inf)\b", out.lower()), out
    if command == "eval":  # strict JSON: NaN or Infinity would not parse
        result = json.loads((workdir / "eval" / "eval.json").read_text(), parse_constant=lambda c: math.nan)
        assert all(math.isfinite(p) for run in result["runs"] for row in run["rows"].values()
                   for p in row["chunk_perplexity"])
    if command == "bench":
        (lengths, repeats), = reached
        assert 1 <= len(lengths) <= 16 and all(2 <= n <= 4096 for n in lengths)
        assert repeats is None or 1 <= repeats <= 100
