"""The option checks the commands call before any work (tintc/eval/options.py, bench.parse_lengths):
each refusal names the option, what it got and what is allowed; what passes comes back parsed."""

import re

import pytest

from ir.errors import ConfigError, TintcError
from tintc.bench import MAX_LENGTHS, parse_lengths
from tintc.eval import options


def test_lrs_parse_or_name_the_option():
    assert options.parse_lrs(None) is None
    assert options.parse_lrs("1e-3,0.5") == (1e-3, 0.5)
    for bad in ("", "0", "1e-3,1e-3", "x", "-1"):
        message = f"--lrs: got {bad!r}; allowed: comma-separated distinct numbers > 0"
        with pytest.raises(ConfigError, match=re.escape(message)):
            options.parse_lrs(bad)


def test_classify_takes_data_and_no_language_modelling_option(tmp_path):
    data = tmp_path / "d.jsonl"
    options.check_classify(data, {"--text": None, "--chunks": None})  # nothing to refuse
    with pytest.raises(ConfigError, match=re.escape("--text, --chunks: got with --task classify; allowed: --data")):
        options.check_classify(data, {"--text": tmp_path, "--length": None, "--chunks": 3})
    with pytest.raises(ConfigError, match=re.escape("--data: missing; allowed: a JSON-lines file")):
        options.check_classify(None, {"--text": None})


def test_lm_takes_one_text_source_and_chunks_from_zero(tmp_path):
    prose = tmp_path / "prose.txt"
    prose.write_text("some words of text\n", encoding="utf-8")
    source, chunks = options.check_lm(None, prose, None, None)
    assert source.text == "some words of text\n" and chunks == options.DEFAULT_CHUNKS
    assert options.check_lm(None, prose, None, 0)[1] is None  # 0: every chunk
    assert options.check_lm(None, prose, None, 3)[1] == 3
    for args, message in [((prose, prose, None, None), "--data: got with --task lm"),
                          ((None, prose, tmp_path, None), "--text, --dataset: got both; allowed: at most one"),
                          ((None, prose, None, -1), "--chunks: got -1; allowed: 0 (every chunk) or a positive")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            options.check_lm(*args)


def test_bench_lengths_at_most_sixteen_distinct():
    assert parse_lengths("64,16,64") == [16, 64]
    assert parse_lengths(",".join(str(n) for n in range(2, 2 + MAX_LENGTHS))) == list(range(2, 2 + MAX_LENGTHS))
    message = f"--lengths: got {MAX_LENGTHS + 1} lengths; allowed: at most {MAX_LENGTHS}"
    with pytest.raises(TintcError, match=re.escape(message)):
        parse_lengths(",".join(str(n) for n in range(2, 3 + MAX_LENGTHS)))
