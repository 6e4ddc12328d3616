"""The option checks the commands call before any work (tintc/options.py):
each refusal names the option, what it got and what is allowed; what passes comes back parsed."""

import re

import pytest

from ir.errors import ConfigError
from tintc import options


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
                          ((None, prose, tmp_path, None), "--text, --dataset: got both; allowed: at most one")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            options.check_lm(*args)


def test_bench_lengths_at_most_sixteen_distinct():
    most = options.MAX_BENCH_LENGTHS
    assert options.bench_lengths("64,16,64") == [16, 64]
    assert options.bench_lengths(",".join(str(n) for n in range(2, 2 + most))) == list(range(2, 2 + most))
    message = f"--lengths: got {most + 1} lengths; allowed: at most {most}"
    with pytest.raises(ConfigError, match=re.escape(message)):
        options.bench_lengths(",".join(str(n) for n in range(2, 3 + most)))
