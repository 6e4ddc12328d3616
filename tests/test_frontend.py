"""The frontend: supported variants trace and reproduce the HF logits; unsupported models
fail with a FrontendError naming the module path and the reason; local checkpoints load."""

import re

import pytest
import torch
from torch import nn
from transformers import GPTJConfig, GPTJForCausalLM

from ir.frontend import ADAPTERS, load_model, trace
from ir.text import dump, parse
from ir.errors import FrontendError
from tests.models import TINY, tiny_model
from tests.test_interpret import max_logit_error


def traces_and_matches(model, dtype=torch.float32):
    graph = trace(model)
    assert max_logit_error(model, graph, 16) <= (1e-5 if dtype == torch.float32 else 1e-10)
    return graph


def test_every_adapter_has_a_tiny_config():
    assert sorted(ADAPTERS) == sorted(TINY)


@pytest.mark.parametrize("hf_fn, ir_fn", [("relu", "relu"), ("gelu", "gelu"), ("gelu_new", "gelu_tanh")])
def test_gpt2_activation_variants(hf_fn, ir_fn):
    graph = traces_and_matches(tiny_model("gpt2", activation_function=hf_fn))
    assert [n.attrs["fn"] for n in graph.nodes() if n.kind == "activation"] == [ir_fn, ir_fn]


def test_gpt2_scale_attn_by_inverse_layer_idx():
    graph = traces_and_matches(tiny_model("gpt2", scale_attn_by_inverse_layer_idx=True))
    scales = [n.attrs["scale"] for n in graph.nodes() if n.kind == "attention"]
    assert scales == pytest.approx([8**-0.5, 8**-0.5 / 2], rel=1e-15)


def test_gpt2_tied_embeddings_share_one_weight():
    graph = traces_and_matches(tiny_model("gpt2"))
    assert graph.node("logits").weights["weight"].name == "transformer.wte.weight"
    assert "lm_head.weight" not in graph.weight_shapes


def test_gpt2_untied_embeddings():
    model = tiny_model("gpt2", tie_word_embeddings=False)
    assert model.lm_head.weight is not model.transformer.wte.weight
    graph = traces_and_matches(model)
    assert graph.node("logits").weights["weight"].name == "lm_head.weight"
    assert graph.weight_shapes["lm_head.weight"] == (64, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_opt_without_biases(dtype):
    graph = traces_and_matches(tiny_model("opt", dtype=dtype, enable_bias=False), dtype)
    linears = [n for n in graph.nodes() if n.kind == "linear"]
    assert len(linears) == 12
    assert all(set(n.weights) == {"weight"} for n in linears)


def test_opt_positions_are_offset_by_two():
    graph = trace(tiny_model("opt"))
    assert graph.node("pos_embed").attrs["offset"] == 2
    assert graph.weight_shapes["model.decoder.embed_positions.weight"] == (34, 32)


# -- unsupported models -----------------------------------------------------------


def trace_error(model) -> FrontendError:
    with pytest.raises(FrontendError) as info:
        trace(model)
    return info.value


def test_every_opt_problem_is_listed_at_once():
    err = trace_error(tiny_model("opt", activation_function="silu", layer_norm_elementwise_affine=False))
    assert [p.split(":")[0] for p in err.problems] == ["model.decoder.layers.*.self_attn_layer_norm",
                                                       "model.decoder.layers.*.activation_fn"]
    assert str(err).startswith("cannot trace OPTForCausalLM: ")


def test_gpt2_cross_attention_is_refused():
    err = trace_error(tiny_model("gpt2", add_cross_attention=True))
    assert err.problems == [
        "transformer.h.*.crossattention: cross-attention (add_cross_attention=True) is not supported"]


def test_unsupported_activation_is_refused():
    err = trace_error(tiny_model("gpt2", activation_function="silu"))
    assert err.problems == [
        "transformer.h.*.mlp.act: activation_function='silu' is not supported; allowed: gelu_new, "
        "gelu_pytorch_tanh, gelu, relu"]


def test_unsupported_model_class_lists_the_supported_ones():
    torch.manual_seed(0)
    gptj = GPTJForCausalLM(GPTJConfig(n_embd=32, n_layer=1, n_head=4, rotary_dim=4, vocab_size=64, n_positions=32,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0))
    err = trace_error(gptj)
    assert str(err) == ("frontend error: model class GPTJForCausalLM is not supported; supported: "
                        "GPT2LMHeadModel, OPTForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, "
                        "GPTNeoXForCausalLM, Phi3ForCausalLM, Olmo2ForCausalLM, "
                        "Qwen3ForCausalLM, "
                        "BloomForCausalLM, "
                        "Gemma2ForCausalLM")


def test_unknown_family_is_refused():
    with pytest.raises(FrontendError, match="model family 'gptj' is not supported; supported: bloom, gemma2, gpt2, "
                                            "gpt_neox, llama, mistral, olmo2, opt, phi3, qwen2, "
                                            "qwen3"):
        load_model("gptj", "/nonexistent")


def test_extra_parameter_names_its_module():
    model = tiny_model("gpt2")
    model.transformer.h[1].extra = nn.Linear(32, 32)
    err = trace_error(model)
    assert [p.split(":")[0] for p in err.problems] == ["transformer.h.1.extra.weight", "transformer.h.1.extra.bias"]
    assert "module transformer.h.1.extra holds a parameter that no op of the gpt2 adapter reads" in err.problems[0]


@pytest.mark.parametrize("family, module, mlp", [("gpt2", "transformer.h.0.mlp", lambda m: m.transformer.h[0].mlp),
                                                  ("llama", "model.layers.0.mlp", lambda m: m.model.layers[0].mlp)])
def test_an_unrecognised_op_names_its_module_path_aten_op_and_source_line(family, module, mlp):
    model = tiny_model(family)
    patched = mlp(model)
    original = patched.forward
    patched.forward = lambda x: original(x) * 2.0  # a scaled MLP output: no IR pattern
    err = trace_error(model)
    assert len(err.problems) == 1
    assert err.problems[0].startswith(f"{module}: aten.mul (")
    assert re.search(r"\(mul_\d+, modeling_\w+\.py:\d+\)", err.problems[0])  # fx node and source line
    assert "matches no pattern the IR knows" in err.problems[0]


def test_changed_behaviour_that_traces_fails_the_logits_check(monkeypatch):
    model = tiny_model("gpt2")
    # the trace reads the position offset from the adapter: a wrong one is caught by the logits
    monkeypatch.setattr(type(ADAPTERS["gpt2"]), "position_offset", 1)
    err = trace_error(model)
    assert len(err.problems) == 1
    assert err.problems[0].startswith("the traced graph gives logits ")
    assert "the gpt2 adapter missed or misread an op" in err.problems[0]


# -- local checkpoints --------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(TINY))
def test_load_model_from_a_local_directory(family, tmp_path):
    model = tiny_model(family)
    model.save_pretrained(tmp_path)
    loaded = load_model(family, tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    graph = trace(loaded)
    assert dump(parse(dump(graph))) == dump(trace(model))


def test_load_model_in_fp64(tmp_path):
    tiny_model("opt").save_pretrained(tmp_path)
    loaded = load_model("opt", tmp_path, dtype=torch.float64)
    assert next(loaded.parameters()).dtype == torch.float64
    traces_and_matches(loaded, torch.float64)


def test_load_model_missing_directory_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FrontendError) as info:
        load_model("gpt2", missing)
    assert info.value.problems == [f"model.path {str(missing)!r} is not a local directory (the hub is never used)"]


def test_opt_without_final_layer_norm_is_refused():
    err = trace_error(tiny_model("opt", _remove_final_layer_norm=True))
    assert err.problems == [
        "model.decoder.final_layer_norm: missing (_remove_final_layer_norm=True) is not supported"]
