"""The fast path of the frontend (ir/frontend/repeat.py): a model of more than two layers is
traced through an export of its first two, the second repeated. It must give the graph of
the whole trace byte for byte, and a model whose layers are not alike must take the whole
trace or fail; never a wrong graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.gpt2 import modeling_gpt2
from transformers.models.llama import modeling_llama

import ir.frontend
from ir.frontend import repeat, trace, trace_repeated
from ir.text import dump
from ir.errors import FrontendError
from tests.models import tiny_model

LAYERS = {"gpt2": "n_layer", "bloom": "n_layer"}  # the config key of the layer count; the others: num_hidden_layers


def deep_model(family: str, n_layer: int = 4, **overrides):
    return tiny_model(family, **{LAYERS.get(family, "num_hidden_layers"): n_layer}, **overrides)


@pytest.mark.parametrize("family, overrides", [
    ("gpt2", {}),
    ("gpt2", dict(activation_function="relu", tie_word_embeddings=False)),
    ("opt", {}),
    ("opt", dict(enable_bias=False)),
    ("opt", dict(do_layer_norm_before=False, word_embed_proj_dim=16)),  # post-LN, project_in/out
    ("llama", {}),
    ("llama", dict(tie_word_embeddings=False, dtype=torch.float64)),
    ("qwen2", {}),
    ("mistral", {}),
    ("mistral", dict(sliding_window=4)),
    ("gpt_neox", {}),  # parallel residual
    ("gpt_neox", dict(use_parallel_residual=False)),
    ("gemma2", dict(layer_types=["full_attention"] * 4)),  # eager attention, embeddings × √D, (1 + w) norms
    ("gemma2", {}),  # alternate sliding and full layers: each repeated attention takes its layer's window
    ("gemma2", dict(sliding_window=4)),  # a window the logit check (8 tokens) sees
    ("bloom", {}),  # its layers return (output, attention weights): the relay returns a tuple too
], ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={v[k]}" for k in v) or "default")
def test_repeated_layers_give_the_whole_trace_byte_for_byte(family, overrides):
    model = deep_model(family, **overrides)
    fast = trace_repeated(model, f"{family}-deep")
    whole = trace(model, f"{family}-deep", whole=True)
    assert dump(fast) == dump(whole)
    assert fast.attrs["n_layer"] == 4


def test_trace_exports_layer_0_and_a_relay_of_a_deep_model(monkeypatch):
    exported = []
    export = torch.export.export

    def recording(module, *args, **kwargs):
        exported.append([type(layer).__name__ for layer in module.get_submodule("model.layers")])
        return export(module, *args, **kwargs)

    monkeypatch.setattr(torch.export, "export", recording)
    model = deep_model("llama", n_layer=5)
    graph = trace(model)
    assert exported == [["LlamaDecoderLayer", "Relay"]]
    assert graph.attrs["n_layer"] == 5 and len(model.model.layers) == 5  # the model is untouched


def test_the_view_shares_the_models_modules_and_parameters():
    model = deep_model("gpt2")
    view = repeat.relayed(model, "transformer.h")
    assert len(model.transformer.h) == 4 and isinstance(view.transformer.h[1], repeat.Relay)
    assert view.transformer.h[0] is model.transformer.h[0] and view.transformer.wte is model.transformer.wte
    assert view.lm_head.weight is model.transformer.wte.weight  # tied, still one tensor
    params = dict(model.named_parameters())
    assert all(p is params[n] for n, p in view.named_parameters())


def _exported_view(model, path):
    from ir.frontend.recognize import Recognizer

    view = repeat.relayed(model, path)
    program = torch.export.export(view, (torch.zeros(1, 8, dtype=torch.long),), {"use_cache": False})
    recognizer = Recognizer(ir.frontend.ADAPTERS["gpt2"], view, program, "gpt2")
    return program, recognizer, recognizer.run()


def test_what_runs_between_layers_is_checked():
    program, recognizer, small = _exported_view(deep_model("gpt2"), "transformer.h")
    assert repeat.relay_input(program, recognizer.values, "transformer.h") == "h0.resid_mlp"
    relay = next(n for n in program.graph.nodes if n.meta.get("nn_module_stack", {}) and
                 list(n.meta["nn_module_stack"].values())[-1][0] == "transformer.h.1")
    with program.graph.inserting_before(relay):  # an op of the model between layer 0 and layer 1
        scaled = program.graph.call_function(torch.ops.aten.mul.Tensor, (relay.args[0], 2.0))
    relay.args = (scaled, *relay.args[1:])
    with pytest.raises(repeat.NotRepeatable, match=r"computes aten.mul \(mul\w*\) between two layers"):
        repeat.relay_input(program, recognizer.values, "transformer.h")


def test_layers_must_pass_their_output_on():
    _, _, small = _exported_view(deep_model("gpt2"), "transformer.h")
    assert len(repeat.repeat_layers(small, 4, "transformer.h", "h0.resid_mlp")) == len(small) + 3 * 12  # 12 ops a layer
    with pytest.raises(repeat.NotRepeatable, match=r"%ln_final after the layers reads layer 0's"):
        repeat.repeat_layers(small, 4, "transformer.h", "h0.resid_attn")  # not what follows the layers reads


def test_layers_with_per_layer_settings_take_the_whole_trace():
    model = deep_model("gpt2", scale_attn_by_inverse_layer_idx=True)  # attention scale 1/(index + 1)
    with pytest.raises(repeat.NotRepeatable, match=r"^transformer.h.1.attn differs from transformer.h.0.attn$"):
        trace_repeated(model)
    scales = [n.attrs["scale"] for n in trace(model).nodes() if n.kind == "attention"]
    assert scales == pytest.approx([8**-0.5 / (i + 1) for i in range(4)], rel=1e-15)


def test_a_layer_with_another_module_takes_the_whole_trace():
    model = deep_model("gpt2")
    model.transformer.h[2].mlp.act = nn.ReLU()  # layer 2 only: not in the two exported layers
    with pytest.raises(repeat.NotRepeatable, match=r"^transformer.h.2.mlp.act differs from transformer.h.0.mlp.act$"):
        repeat.unlike_layers(model, "transformer.h")
    graph = trace(model)  # the whole trace, checked against the logits
    assert [n.attrs["fn"] for n in graph.nodes() if n.kind == "activation"] == ["gelu_tanh", "gelu_tanh", "relu",
                                                                                "gelu_tanh"]


def test_mixed_layer_types_are_not_repeated():
    model = deep_model("qwen2", layer_types=["full_attention", "full_attention", "sliding_attention",
                                             "full_attention"])
    with pytest.raises(repeat.NotRepeatable, match=r"config.layer_types holds several types"):
        repeat.unlike_layers(model, "model.layers")


def test_a_patched_deep_layer_fails_as_the_whole_trace_does():
    model = deep_model("gpt2")
    mlp = model.transformer.h[3].mlp
    original = mlp.forward
    mlp.forward = lambda x: original(x) * 2.0  # layer 3's instance only
    with pytest.raises(repeat.NotRepeatable, match=r"transformer.h.3.mlp differs"):
        repeat.unlike_layers(model, "transformer.h")
    with pytest.raises(FrontendError) as info:
        trace(model)
    assert info.value.problems[0].startswith("transformer.h.3.mlp: aten.mul (")
    assert "modeling_gpt2.py:" in info.value.problems[0]  # the whole trace, with source lines, decided


def test_a_layer_index_in_forward_is_caught_by_the_logit_check(monkeypatch):
    original = modeling_gpt2.GPT2Attention.forward

    def forward(self, *args, **kwargs):  # same modules, but layer 3 computes something else
        out = original(self, *args, **kwargs)
        return (out[0] * 3.0, *out[1:]) if self.layer_idx == 3 else out

    monkeypatch.setattr(modeling_gpt2.GPT2Attention, "forward", forward)
    model = deep_model("gpt2")
    with pytest.raises(FrontendError, match="the traced graph gives logits"):
        trace_repeated(model)
    with pytest.raises(FrontendError) as info:
        trace(model)
    assert info.value.problems[0].startswith("transformer.h.3.attn: aten.mul (")


def test_an_error_in_the_exported_layers_is_reported_by_the_whole_trace(monkeypatch):
    original = modeling_llama.LlamaMLP.forward
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", lambda self, x: original(self, x) * 2.0)  # every layer
    model = deep_model("llama")
    repeat.unlike_layers(model, "model.layers")  # alike: the fast path runs, and fails
    with pytest.raises(FrontendError) as info:
        ir.frontend.trace(model)
    assert info.value.problems[0].startswith("model.layers.0.mlp: aten.mul (")
    assert "modeling_llama.py:" in info.value.problems[0]  # the lean export records no source lines


@pytest.mark.parametrize("family, overrides", [
    ("gpt2", {}),
    ("opt", dict(do_layer_norm_before=False, word_embed_proj_dim=16)),  # post-LN, project_in/out
    ("llama", dict(tie_word_embeddings=False, dtype=torch.float64)),
    ("qwen2", {}),
    ("gpt_neox", {}),
    ("phi3", {}),
    ("olmo2", {}),
    ("gemma2", {}),  # alternate sliding and full layers
    ("bloom", {}),
], ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={v[k]}" for k in v) or "default")
def test_the_graph_from_the_config_alone_is_the_trace_of_the_model(family, overrides, monkeypatch):
    model = deep_model(family, n_layer=5, **overrides)
    built = []
    random_model = ir.frontend.random_model
    monkeypatch.setattr(ir.frontend, "random_model",
                        lambda *a, **k: built.append(k.get("layers")) or random_model(*a, **k))
    from_config = ir.frontend.trace_from_config(family, model.config, dtype=model.dtype, name="deep")
    assert built == [repeat.MIN_LAYERS]  # one shallow model, never the whole one
    assert dump(from_config) == dump(trace(model, "deep"))
    assert from_config.attrs == trace(model, "deep").attrs and from_config.attrs["n_layer"] == 5


def test_a_config_whose_layers_differ_is_not_traced_from_shapes():
    model = deep_model("qwen2", n_layer=5, layer_types=["full_attention"] * 4 + ["sliding_attention"])
    with pytest.raises(repeat.NotRepeatable, match=r"config.layer_types holds several types"):
        ir.frontend.trace_from_config("qwen2", model.config)
    with pytest.raises(repeat.NotRepeatable, match="3 layers"):  # no deeper than the shallow model
        ir.frontend.trace_from_config("gpt2", deep_model("gpt2", n_layer=3).config)


def test_a_deep_layer_with_another_module_is_found_on_the_meta_device():
    config = deep_model("gpt2", n_layer=5).config
    whole = ir.frontend.meta_model("gpt2", config)
    whole.transformer.h[4].mlp.extra = nn.Linear(2, 2, device="meta")  # a deep layer's own module
    with pytest.raises(repeat.NotRepeatable, match="transformer.h.4 has other submodules than transformer.h.0"):
        repeat.unlike_layers(whole, "transformer.h")
