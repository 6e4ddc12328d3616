"""model.yaml loading: the examples load, and each mistake is reported at file:line with what is allowed."""

from pathlib import Path

import pytest
import torch

from tintc.config import TintcConfig, load_config, parse_config
from ir.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

GOOD = """\
model:
  family: gpt2
  config: {n_embd: 64, n_layer: 2, n_head: 4, vocab_size: 128, n_positions: 64}
  seed: 0
tint:
  prefixes: 16
  train:
    layers: all
    steps: 1
    lr: 1.0e-3
    loss: context
output: out
"""


def write(tmp_path: Path, text: str, name: str = "model.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def one_problem(tmp_path: Path, text: str) -> str:
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1, problems
    return problems[0]


# --- what loads ---------------------------------------------------------------------


@pytest.mark.parametrize("name,family", [("gpt2-tiny.yaml", "gpt2"), ("opt-tiny.yaml", "opt")])
def test_examples_load(name, family):
    config = load_config(REPO / "examples" / name)
    assert isinstance(config, TintcConfig)
    assert config.model.family == family
    assert config.model.path is None and config.model.config["vocab_size"] == 128
    assert config.tint.prefixes == 16
    assert config.tint.train.kinds == ["attn_v", "attn_o", "mlp_in", "mlp_out", "norm_bias"]
    assert config.tint.approximations.scale == 1000.0
    assert config.resolved_output == REPO / "build" / name.removesuffix(".yaml")
    assert config.trained_layers(2) == [0, 1]
    assert config.name == name.removesuffix(".yaml")


def test_defaults_and_helpers(tmp_path):
    text = GOOD.replace("layers: all", "layers: top-1") + "\n"
    text = text.replace("loss: context", "loss: context\n  dtype: float64")
    config = load_config(write(tmp_path, text))
    assert config.trained_layers(2) == [1]
    assert config.trained_layers(5) == [4]
    assert config.torch_dtype is torch.float64
    assert config.tint.approximations.rules == {"attention": "exact", "layer_norm": "exact", "activation": "exact"}
    assert config.tint.approximations.rule_set == "exact"  # issue 24: every rule exact by default
    assert config.tint.train.kinds == ["attn_v", "attn_o", "mlp_in", "mlp_out", "norm_bias"]
    assert config.resolved_output == (tmp_path / "out").resolve()
    assert config.resolved_model_path is None


def test_model_path_resolves_against_the_yaml_directory(tmp_path):
    import transformers

    transformers.GPT2Config(n_embd=16, n_layer=1, n_head=4).save_pretrained(tmp_path / "weights")
    text = "model:\n  family: gpt2\n  path: weights\ntint:\n  prefixes: 1\n"
    config = load_config(write(tmp_path, text))
    assert config.resolved_model_path == (tmp_path / "weights").resolve()
    assert config.resolved_output == (tmp_path / "build" / "model").resolve()


def test_model_path_with_saved_config_is_checked(tmp_path):
    import transformers

    transformers.GPT2Config(n_embd=48, n_layer=3, n_head=4).save_pretrained(tmp_path / "weights")
    text = "model:\n  family: gpt2\n  path: weights\ntint:\n  prefixes: 32\n"
    problem = one_problem(tmp_path, text)
    assert problem.startswith(f"{tmp_path / 'model.yaml'}:5: tint.prefixes: got 32; ")
    assert "a divisor of the hidden size 48" in problem


def test_parse_config_from_a_string():
    config = parse_config(GOOD)
    assert config.model.config["n_embd"] == 64
    assert config.name == "gpt2"
    assert config.resolved_output == (Path.cwd() / "out").resolve()


# --- each mistake, at its line ------------------------------------------------------


def test_unknown_top_level_key(tmp_path):
    problem = one_problem(tmp_path, GOOD + "outptu: x\n")
    assert problem == f"{tmp_path / 'model.yaml'}:13: outptu: unknown key; allowed: model | tint | eval | output"


def test_unknown_nested_key(tmp_path):
    problem = one_problem(tmp_path, GOOD.replace("    steps: 1", "    stpes: 1"))
    assert problem.startswith(f"{tmp_path / 'model.yaml'}:9: tint.train.stpes: unknown key; allowed: ")
    assert "layers | steps | lr | loss | kinds" in problem


def test_wrong_type(tmp_path):
    problem = one_problem(tmp_path, GOOD.replace("steps: 1", "steps: two"))
    assert problem.endswith("model.yaml:9: tint.train.steps: got 'two'; allowed: an integer from 1 to 64")


def test_bad_enum(tmp_path):
    problem = one_problem(tmp_path, GOOD.replace("loss: context", "loss: foo"))
    assert problem.endswith("model.yaml:11: tint.train.loss: got 'foo'; allowed: context | label_only")


def test_bad_kind_in_list(tmp_path):
    text = GOOD.replace("loss: context", "loss: context\n    kinds: [attn_v, mlp]")
    problem = one_problem(tmp_path, text)
    assert "model.yaml:12: tint.train.kinds[1]: got 'mlp'; allowed: attn_q | attn_k | attn_v" in problem


@pytest.mark.parametrize("layers,shown", [("top-0", "'top-0'"), ("top-x", "'top-x'"), ("3", "3")])
def test_layers_malformed(tmp_path, layers, shown):
    problem = one_problem(tmp_path, GOOD.replace("layers: all", f"layers: {layers}"))
    assert problem.endswith(f"model.yaml:8: tint.train.layers: got {shown}; allowed: all | top-N with N >= 1")


def test_layers_more_than_the_model_has(tmp_path):
    problem = one_problem(tmp_path, GOOD.replace("layers: all", "layers: top-9"))
    assert problem.endswith(
        "model.yaml:8: tint.train.layers: got 'top-9'; allowed: all | top-N with 1 <= N <= 2 (model.config.n_layer)"
    )


def test_prefixes_must_divide_the_width(tmp_path):
    problem = one_problem(tmp_path, GOOD.replace("prefixes: 16", "prefixes: 24"))
    assert problem.endswith(
        "model.yaml:6: tint.prefixes: got 24; allowed: a divisor of the hidden size 64 (model.config.n_embd): "
        "1 | 2 | 4 | 8 | 16 | 32 | 64"
    )


def test_prefixes_are_not_checked_when_nothing_is_stacked(tmp_path):
    """With prefix stacking off every prefix token holds one row (K = Dout): tint.prefixes is not used, so a
    value that would not divide the width is no problem, and the TinT compiles."""
    from tintc import pipeline

    text = GOOD.replace("prefixes: 16", "prefixes: 24\n  passes: {prefix_stacking: {enabled: false}}")
    cfg = load_config(write(tmp_path, text))
    assert cfg.tint.prefixes == 24 and not cfg.tint.passes.prefix_stacking.enabled
    blocks = pipeline.compile_tint(cfg).tint.program.layout.blocks.values()
    assert all(b.rows == 1 for b in blocks if b.kind == "linear")  # one row per prefix token


def test_heads_must_divide_the_width(tmp_path):
    problem = one_problem(tmp_path, GOOD.replace("n_head: 4", "n_head: 5"))
    assert problem.endswith(
        "model.yaml:3: model.config.n_head: got 5; allowed: a divisor of the hidden size 64 (model.config.n_embd)"
    )


def test_opt_width_key_is_named(tmp_path):
    text = (REPO / "examples" / "opt-tiny.yaml").read_text().replace("prefixes: 16", "prefixes: 48")
    problem = one_problem(tmp_path, text)
    assert "tint.prefixes: got 48; allowed: a divisor of the hidden size 64 (model.config.hidden_size)" in problem


def test_config_and_path_both_given(tmp_path):
    (tmp_path / "weights").mkdir()
    text = GOOD.replace("  seed: 0", "  path: weights\n  seed: 0")
    problem = one_problem(tmp_path, text)
    assert problem.endswith(
        "model.yaml:4: model.path: got both model.config and model.path; "
        "allowed: exactly one of model.config (random init) | model.path"
    )


def test_neither_config_nor_path(tmp_path):
    problem = one_problem(tmp_path, "model:\n  family: gpt2\n")
    assert problem.endswith("model.yaml:1: model: got neither model.config nor model.path; "
                            "allowed: exactly one of model.config (random init) | model.path")


def test_missing_model_path_directory(tmp_path):
    problem = one_problem(tmp_path, "model:\n  family: gpt2\n  path: nowhere\n")
    assert "model.yaml:3: model.path: got 'nowhere'" in problem
    assert problem.endswith("allowed: an existing local directory")


def test_unknown_family(tmp_path):
    problem = one_problem(tmp_path, GOOD.replace("family: gpt2", "family: llama3"))
    assert problem.endswith("model.yaml:2: model.family: got 'llama3'; allowed: bloom | gemma2 | gpt2 | gpt_neox | llama | mistral | olmo2 | opt"
                              " | phi3 | qwen2 | qwen3")


def test_unknown_hf_config_key(tmp_path):
    problem = one_problem(tmp_path, GOOD.replace("n_head: 4", "n_heads: 4"))
    assert problem.endswith(
        "model.yaml:3: model.config.n_heads: unknown GPT2Config key; allowed: a GPT2Config key (closest: n_head | n_embd)"
    )
    problem = one_problem(tmp_path, GOOD.replace("n_head: 4", "n_head: 4, zzz: 1"))
    assert "model.config.zzz: unknown GPT2Config key; allowed: a GPT2Config key: " in problem
    assert "| n_embd | n_head |" in problem


def test_wrong_hf_config_type(tmp_path):
    problem = one_problem(tmp_path, GOOD.replace("n_embd: 64", "n_embd: wide"))
    assert problem.endswith("model.yaml:3: model.config.n_embd: got 'wide'; allowed: int")


def test_yaml_syntax_error(tmp_path):
    problem = one_problem(tmp_path, GOOD.replace("    steps: 1", "    steps: [1, 2"))
    assert problem.startswith(f"{tmp_path / 'model.yaml'}:")
    assert "YAML syntax error" in problem
    assert int(problem.split(":")[1]) >= 9


def test_misspelt_hf_key_does_not_trigger_shape_checks_on_defaults(tmp_path):
    # n_heads is a typo: the default n_head (12) does not divide 64, but that is not the user's mistake
    problems = problems_of(tmp_path, GOOD.replace("n_head: 4", "n_heads: 4").replace("prefixes: 16", "prefixes: 24"))
    assert [p.split(": ")[1] for p in problems] == ["model.config.n_heads"]


def test_yaml_duplicate_key(tmp_path):
    problem = one_problem(tmp_path, GOOD.replace("    lr: 1.0e-3", "    lr: 1.0e-3\n    lr: 2.0e-3"))
    assert problem.endswith("model.yaml:11: tint.train.lr: duplicate key (first on line 10); allowed: each key once")


def test_not_a_mapping(tmp_path):
    assert one_problem(tmp_path, "").endswith("model.yaml:1: got an empty file; allowed: a mapping with keys model, tint, eval, output")
    assert "got list" in one_problem(tmp_path, "- 1\n")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yaml")
    assert str(tmp_path / "absent.yaml") in str(info.value)
    assert "cannot read the config file" in str(info.value)


def test_every_problem_is_reported_at_once(tmp_path):
    text = (
        GOOD.replace("n_head: 4", "n_head: 4, colour: red")
        .replace("prefixes: 16", "prefixes: 0")
        .replace("steps: 1", "steps: two")
        .replace("loss: context", "loss: foo")
        + "extra: 1\n"
    )
    problems = problems_of(tmp_path, text)
    where = [p.split(": ")[0].rsplit(":", 1)[1] + " " + p.split(": ")[1] for p in problems]
    assert where == [
        "3 model.config.colour",
        "6 tint.prefixes",
        "9 tint.train.steps",
        "11 tint.train.loss",
        "13 extra",
    ]
    message = str(ConfigError(problems))
    assert message.startswith("config error: 5 problems")


def test_query_key_kinds_need_the_exact_attention_rule(tmp_path):
    path = tmp_path / "qk.yaml"
    path.write_text(
        "model:\n  family: gpt2\n  config: {n_embd: 32, n_layer: 2, n_head: 4}\n"
        "tint:\n  prefixes: 8\n  approximations: paper\n  train:\n    kinds: [attn_q, attn_v]\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert f"{path}:8: tint.train.kinds: got attn_q with approximations.attention: stop_gradient" in message
    assert "allowed: approximations.attention: exact" in message
    path.write_text(path.read_text().replace("approximations: paper", "approximations: {attention: exact}"))
    assert load_config(path).tint.train.kinds == ["attn_q", "attn_v"]
    path.write_text(path.read_text().replace("approximations: {attention: exact}", "approximations: exact"))
    assert load_config(path).tint.train.kinds == ["attn_q", "attn_v"]
    path.write_text(path.read_text().replace("  approximations: exact\n", ""))  # the default: exact
    assert load_config(path).tint.train.kinds == ["attn_q", "attn_v"]


@pytest.mark.parametrize("value, rules", [
    ("exact", {"attention": "exact", "layer_norm": "exact", "activation": "exact"}),
    ("paper", {"attention": "stop_gradient", "layer_norm": "finite_difference", "activation": "finite_difference"}),
    ("{activation: finite_difference, scale: 10}", {"attention": "exact", "layer_norm": "exact",
                                                    "activation": "finite_difference"}),
])
def test_approximations_take_a_named_rule_set_or_a_mapping(tmp_path, value, rules):
    text = "model:\n  family: gpt2\n  config: {n_embd: 32, n_layer: 2, n_head: 4}\ntint:\n  approximations: " + value
    approximations = load_config(write(tmp_path, text + "\n")).tint.approximations
    assert approximations.rules == rules
    assert approximations.rule_set == (value if value in ("exact", "paper") else
                                       "mixed (attention exact, layer_norm exact, activation finite_difference)")


@pytest.mark.parametrize("value, got", [("fast", "'fast'"), ("Exact", "'Exact'"), ("3", "3"), ("[exact]", "['exact']")])
def test_approximations_other_than_a_rule_set_or_mapping_name_what_is_allowed(tmp_path, value, got):
    text = "model:\n  family: gpt2\n  config: {n_embd: 32, n_layer: 2, n_head: 4}\ntint:\n  approximations: " + value
    assert one_problem(tmp_path, text + "\n").endswith(
        f":5: tint.approximations: got {got}; allowed: exact | paper | a mapping of attention, layer_norm, "
        "activation, scale")


# --- the default trained kinds: the paper's that the family has ---------------------

PLAIN_MLP_KINDS = ["attn_v", "attn_o", "mlp_in", "mlp_out", "norm_bias"]
GATED_MLP_KINDS = ["attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down"]  # and RMSNorm: no bias
DEFAULT_KINDS = {"gpt2": PLAIN_MLP_KINDS, "opt": PLAIN_MLP_KINDS, "gpt_neox": PLAIN_MLP_KINDS,
                 "llama": GATED_MLP_KINDS, "qwen2": GATED_MLP_KINDS, "mistral": GATED_MLP_KINDS,
                 "phi3": GATED_MLP_KINDS, "olmo2": GATED_MLP_KINDS,
                 "qwen3": GATED_MLP_KINDS,
                 "bloom": PLAIN_MLP_KINDS,
                 "gemma2": GATED_MLP_KINDS}


def test_every_tiny_family_has_its_default_kinds_listed():
    from tests.models import TINY

    assert set(DEFAULT_KINDS) == set(TINY)  # a new family in tests/models.py is checked here too


def trained_kinds(graph) -> list[str]:
    """The kinds of which the training graph descends at least one weight slot."""
    from ir.passes.select_train import KINDS

    marked = {(node.attrs["role"], slot) for node in graph.nodes() if node.kind.endswith("_descent")
              for slot in node.weights}
    return [kind for kind, (roles, slots) in KINDS.items() if any((r, s) in marked for r in roles for s in slots)]


@pytest.mark.parametrize("family", sorted(DEFAULT_KINDS))
def test_a_minimal_config_of_every_family_compiles_with_its_default_kinds(family):
    import json

    from tests.models import TINY
    from tintc import pipeline

    config = parse_config(json.dumps({"model": {"family": family, "config": TINY[family]}}))  # JSON is YAML
    assert config.tint.train.kinds == DEFAULT_KINDS[family]
    compiled = pipeline.compile_tint(config)
    assert trained_kinds(compiled.train_graph) == DEFAULT_KINDS[family]  # in KINDS order, as listed


def test_kinds_given_in_the_config_replace_the_default(tmp_path):
    config = load_config(write(tmp_path, GOOD.replace("loss: context", "loss: context\n    kinds: [attn_o]")))
    assert config.tint.train.kinds == ["attn_o"]
