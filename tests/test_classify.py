"""`tintc eval --task classify`: each row against a direct computation on prompts built here
from the data, and the CLI's errors naming their culprit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tintc import pipeline
from tintc.eval import classify
from tintc.eval.classify import ClassifySettings, evaluate
from tintc.eval.classify_render import worst_vs_g_hat
from tintc.cli import app
from tintc.config import parse_config
from tintc.eval.run import EXACT, G_HAT, TINT
from tintc.oracle.reference import TrainSettings, approx_gd
from tests.models import TINY, tiny_model
from tests.test_eval import _sgd

WORDS = {"pos": ["ab", "ac", "bd", "ad"], "neg": ["xy", "yz", "wx", "zz"]}
LABEL_WORDS = {"pos": "+", "neg": "-"}


def _data(tmp_path, n=10) -> Path:
    """A synthetic two-class set: words of the letters a-d are 'pos', of w-z 'neg'."""
    path = tmp_path / "data.jsonl"
    rng = torch.Generator().manual_seed(0)
    lines = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        lines.append(json.dumps({"text": WORDS[label][int(torch.randint(4, (1,), generator=rng))], "label": label}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _config(tmp_path, dtype="float64", steps=1, shots=2, **classify_keys) -> dict:
    return {"model": {"family": "gpt2", "config": TINY["gpt2"]},
            "tint": {"prefixes": 8, "max_length": 32, "dtype": dtype, "approximations": "paper",
                     "train": {"lr": 0.05, "steps": steps, "loss": "label_only"}},
            "eval": {"classify": {"template": "{text}=", "labels": LABEL_WORDS, "separator": ";", "shots": shots,
                                  **classify_keys}},
            "output": str(tmp_path / "build")}


def _evaluate(tmp_path, lrs=None, **keys):
    cfg = parse_config(json.dumps(_config(tmp_path, **keys)))  # JSON is YAML
    result = evaluate(cfg, ClassifySettings(_data(tmp_path), lrs=lrs), tmp_path / "eval")
    return cfg, result


def _inputs(tmp_path, result):
    """Each test example's ids, built here from the data lines: the demonstrations 'text=word;',
    then the query 'text=', as UTF-8 bytes modulo the vocabulary; and the positions whose next
    token is a demonstration's label word."""
    rows = [json.loads(line) for line in _data(tmp_path).read_text().splitlines()]
    for line, demos in zip(result.tests, result.demonstrations):
        prompt = "".join(f"{rows[d - 1]['text']}={LABEL_WORDS[rows[d - 1]['label']]};" for d in demos)
        n_train = len(prompt)
        label_positions = [i - 1 for i, c in enumerate(prompt) if c in "+-"]
        prompt += f"{rows[line - 1]['text']}="
        ids = torch.tensor([b % TINY["gpt2"]["vocab_size"] for b in prompt.encode()])[None]
        yield ids, n_train, label_positions


LABEL_IDS = [ord("+") % 64, ord("-") % 64]


def test_prompts_and_draws(tmp_path):
    cfg = parse_config(json.dumps(_config(tmp_path, examples=4, seed=3)))
    spec = cfg.eval.classify
    tests, demos = classify.draw(10, spec)
    assert len(tests) == 4 and tests == sorted(tests) and (tests, demos) == classify.draw(10, spec)
    assert all(len(d) == 2 and i not in d and len(set(d)) == 2 for i, d in zip(tests, demos))
    prompter = classify.Prompter(cfg, spec, 64)
    ids, train, labels = prompter.build([classify.Example("ab", "pos", 1), classify.Example("xy", "neg", 2)],
                                        classify.Example("ad", "pos", 3))
    assert ids[0].tolist() == [b % 64 for b in b"ab=+;xy=-;ad="]
    assert train[0].tolist() == [True] * 10 + [False] * 3
    assert [i for i, m in enumerate(labels[0].tolist()) if m] == [3, 8]


def test_base_rows_are_the_hugging_face_model(tmp_path):
    cfg, result = _evaluate(tmp_path)
    model = pipeline.load_aux_model(cfg)
    assert result.gold == [0 if json.loads(line)["label"] == "pos" else 1
                           for line in _data(tmp_path).read_text().splitlines()]
    for (ids, n_train, _), zero, base in zip(_inputs(tmp_path, result), result.zero_shot, result.base):
        with torch.no_grad():
            full = model(ids).logits[0, -1, LABEL_IDS]
            alone = model(ids[:, n_train:]).logits[0, -1, LABEL_IDS]
        assert base.logits == pytest.approx(full.tolist(), abs=1e-12)
        assert zero.logits == pytest.approx(alone.tolist(), abs=1e-12)
        assert base.prediction == int(full.argmax()) and zero.prediction == int(alone.argmax())
    assert result.accuracy(result.base) == sum(
        b.prediction == g for b, g in zip(result.base, result.gold)) / len(result.gold)


def test_exact_row_is_torch_sgd_on_the_demonstrations_label_words(tmp_path):
    lrs = (0.05, 0.5)
    cfg, result = _evaluate(tmp_path, lrs=lrs, steps=2)
    model = pipeline.load_aux_model(cfg)
    for lr in lrs:
        for (ids, n_train, positions), scores in zip(_inputs(tmp_path, result), result.runs[lr][EXACT]):
            trained = _sgd(model, ids, n_train, lr, steps=2, positions=positions)
            with torch.no_grad():
                logits = trained(ids).logits[0, -1, LABEL_IDS]
            assert scores.logits == pytest.approx(logits.tolist(), abs=1e-10)
    moved = [abs(a - b) for e, b in zip(result.runs[0.5][EXACT], result.base) for a, b in zip(e.logits, b.logits)]
    assert max(moved) > 1e-3  # training on the label words did change the query's logits


def test_g_hat_is_the_oracle_and_the_tint_equals_it(tmp_path):
    cfg, result = _evaluate(tmp_path)
    model = pipeline.load_aux_model(cfg)
    graph = pipeline.trace(cfg, model)
    settings = TrainSettings.from_config(cfg, graph.attrs["n_layer"])
    params = {n: p.detach() for n, p in model.named_parameters()}
    for (ids, n_train, positions), scores in zip(_inputs(tmp_path, result), result.runs[0.05][G_HAT]):
        train = torch.arange(ids.shape[1])[None] < n_train
        labels = torch.zeros_like(train)
        labels[0, torch.tensor(positions) + 1] = True
        logits = approx_gd(graph, params, ids, train, settings, labels).logits[0, -1, LABEL_IDS]
        assert scores.logits == pytest.approx(logits.tolist(), abs=1e-12)
    assert worst_vs_g_hat(result, 0.05, TINT) < 1e-10
    assert (tmp_path / "eval" / "tint" / "tint_model.py").is_file()  # the TinT came from its package


def test_a_label_word_of_several_tokenizer_tokens_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "good", "bad", "very"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    directory = tmp_path / "model"
    tiny_model("gpt2").save_pretrained(str(directory))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(str(directory))
    data = _config(tmp_path)
    data["model"] = {"family": "gpt2", "path": str(directory)}
    data["eval"]["classify"]["labels"] = {"pos": " good", "neg": " bad"}
    cfg = parse_config(json.dumps(data))
    assert classify.Prompter(cfg, cfg.eval.classify, 64).label_ids == [1, 2]
    data["eval"]["classify"]["labels"] = {"pos": " very good", "neg": " bad"}
    cfg = parse_config(json.dumps(data))
    with pytest.raises(classify.ConfigError, match="eval.classify.labels.pos: got ' very good', 2 tokens of "):
        classify.Prompter(cfg, cfg.eval.classify, 64)


def _cli(tmp_path, config: dict, data_text: str | None = None, *options) -> tuple[int, str]:
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(config))
    data = tmp_path / "data.jsonl"
    if data_text is not None:
        data.write_text(data_text, encoding="utf-8")
    run = CliRunner().invoke(app, ["eval", str(path), "--task", "classify", "--data", str(data), *options])
    return run.exit_code, " ".join(run.output.split())


GOOD = "\n".join(json.dumps({"text": t, "label": label}) for t, label in [("ab", "pos"), ("xy", "neg"), ("ac", "pos")])


@pytest.mark.parametrize("change, data_text, options, message", [
    (None, None, (), "--data: got {tmp}/data.jsonl; allowed: a readable UTF-8 JSON-lines file"),
    (None, GOOD + '\n{"text": "ab", "label": pos}', (), "--data: {tmp}/data.jsonl:4: got invalid JSON"),
    (None, GOOD + '\n{"text": "ab", "label": "maybe"}', (),
     "--data: {tmp}/data.jsonl:4: label: got 'maybe'; allowed: one of eval.classify.labels: 'pos' | 'neg'"),
    (None, GOOD + '\n{"text": "ab"}', (), '{tmp}/data.jsonl:4: got \'{{"text": "ab"}}\'; allowed: a JSON object'),
    (("labels", {"pos": "++", "neg": "-"}), GOOD, (),
     "eval.classify.labels.pos: got '++', 2 tokens of no tokenizer: UTF-8 bytes modulo the vocabulary (64); "
     "allowed: a label word that is one byte"),
    (("shots", 3), GOOD, (), "got 3 examples; allowed: at least eval.classify.shots + 1 = 4"),
    (("shotz", 3), GOOD, (), "tiny.yaml:1: eval.classify.shotz: unknown key; allowed: template | labels"),
    (("template", "no slot"), GOOD, (), "eval.classify.template: got 'no slot'; allowed: a string holding {{text}}"),
    (("template", "{text}" + "." * 30), GOOD, (),
     "--data: line 1: got an input of 100 tokens with its demonstrations (lines "),
    (None, GOOD, ("--chunks", "3"), "--chunks: got with --task classify; allowed: --data"),
])
def test_cli_bad_input_names_the_culprit_and_exits_2(tmp_path, change, data_text, options, message):
    config = _config(tmp_path)
    if change is not None:
        config["eval"]["classify"][change[0]] = change[1]
    code, output = _cli(tmp_path, config, data_text, *options)
    assert code == 2, output
    assert message.format(tmp=tmp_path) in output


def test_cli_refuses_a_context_tint_and_a_missing_section(tmp_path):
    config = _config(tmp_path)
    config["tint"]["train"]["loss"] = "context"
    assert _cli(tmp_path, config, GOOD) == (2, "config error: tint.train.loss: got 'context'; allowed: 'label_only' "
                                               "for --task classify")
    del config["eval"]
    code, output = _cli(tmp_path, config, GOOD)
    assert code == 2 and "eval.classify: missing; allowed: a section with template, labels" in output


def test_cli_writes_the_table_and_outputs(tmp_path):
    code, output = _cli(tmp_path, _config(tmp_path, dtype="float32"), GOOD + "\n", "--lrs", "0.05,0.5",
                        "--out", str(tmp_path / "out"))
    assert code == 0, output
    assert "base (0-shot)" in output and "3 test examples, 2-shot" in output
    written = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert [run["lr"] for run in written["runs"]] == [0.05, 0.5]
    assert written["runs"][0]["worst_vs_g_hat"][TINT] < 1e-4  # float32
    assert (tmp_path / "out" / "eval.png").is_file() and (tmp_path / "out" / "eval.md").is_file()


def test_the_example_config_loads():
    from tintc.config import load_config

    cfg = load_config(Path(__file__).resolve().parent.parent / "examples" / "gpt2-tiny-classify.yaml")
    assert cfg.tint.train.loss == "label_only" and cfg.eval.classify.shots == 4
    assert cfg.eval.classify.labels == {"pos": "+", "neg": "-"}
