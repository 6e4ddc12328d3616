"""What an architecture adapter provides, and the shared builder of a pre-LN decoder.

An adapter describes its model as a `DecoderSpec`: widths, settings, and for every
op role the HF parameter (with layout: transpose, row slice) and module it comes
from. `build_pre_ln_decoder` turns that description into IR ops in execution order,
so GPT-2 and OPT share one builder and differ only in their adapter's table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..graph import Graph, WeightRef

# Roles of the ops inside one decoder layer, with their weight slots.
LAYER_ROLES = {
    "ln_attn": ("gain", "bias"),
    "q": ("weight", "bias"),
    "k": ("weight", "bias"),
    "v": ("weight", "bias"),
    "o": ("weight", "bias"),
    "ln_mlp": ("gain", "bias"),
    "mlp_in": ("weight", "bias"),
    "mlp_out": ("weight", "bias"),
}


@dataclass
class LayerSpec:
    refs: dict[str, dict[str, WeightRef]]  # role -> slot -> weight
    modules: dict[str, str]  # role -> HF module path; also "attention" and "block" (the layer)
    scale: float  # attention score scale


@dataclass
class DecoderSpec:
    d_model: int
    n_head: int
    d_ffn: int
    vocab: int
    max_positions: int
    eps: float
    activation: str
    token_embed: WeightRef
    token_module: str
    pos_embed: WeightRef
    pos_module: str
    pos_offset: int
    layers: list[LayerSpec] = field(default_factory=list)
    final_norm: dict[str, WeightRef] = field(default_factory=dict)
    final_norm_module: str = ""
    unembed: WeightRef | None = None
    unembed_module: str = ""


class Adapter:
    """One per model family; subclasses set the class attributes and `describe`."""

    family: str
    config_class: type
    model_class: type

    def check(self, model) -> list[str]:
        """Problems with settings this adapter does not support, each naming its module path."""
        return []

    def describe(self, model) -> DecoderSpec:
        raise NotImplementedError

    def build(self, model, name: str | None = None) -> Graph:
        return build_pre_ln_decoder(self.describe(model), self.family, name or self.family, model)


def norm_refs(module: str) -> dict[str, WeightRef]:
    """The gain and bias of an HF LayerNorm module."""
    return {"gain": WeightRef(f"{module}.weight"), "bias": WeightRef(f"{module}.bias")}


def build_pre_ln_decoder(spec: DecoderSpec, family: str, name: str, model) -> Graph:
    D = spec.d_model
    g = Graph(name, {
        "family": family, "d_model": D, "n_layer": len(spec.layers), "n_head": spec.n_head,
        "d_ffn": spec.d_ffn, "vocab": spec.vocab, "max_positions": spec.max_positions,
    })
    params = dict(model.named_parameters())  # shared (tied) tensors are listed once
    def declare(ref: WeightRef):
        if ref.name not in g.weight_shapes:
            g.declare_weight(ref.name, params[ref.name].shape)
        return ref

    def op(node_name, kind, inputs, shape, module, layer, role=None, weights=None, **attrs):
        meta = {"module": module, "layer": layer} | ({"role": role} if role else {})
        w = {slot: declare(ref) for slot, ref in (weights or {}).items()}
        return g.add(node_name, kind, inputs, shape, attrs | meta, w)

    ids = g.add("ids", "input", (), ("T",), {"module": "", "layer": -1})
    tok = op("tok_embed", "embed", [ids], ("T", D), spec.token_module, -1, weights={"table": spec.token_embed})
    pos = op("pos_embed", "pos_embed", [ids], ("T", D), spec.pos_module, -1,
             weights={"table": spec.pos_embed}, offset=spec.pos_offset)
    h = op("embed", "add", [tok, pos], ("T", D), "", -1)
    hd = D // spec.n_head
    for i, layer in enumerate(spec.layers):
        p = f"h{i}."
        def sub(role, kind, inputs, width, **attrs):
            return op(p + role, kind, inputs, ("T", width), layer.modules[role], i, role,
                      layer.refs.get(role), **attrs)
        a = sub("ln_attn", "layer_norm", [h], D, eps=spec.eps)
        q, k, v = (sub(r, "linear", [a], D) for r in ("q", "k", "v"))
        att = op(p + "attn", "attention", [q, k, v], ("T", D), layer.modules["attention"], i,
                 heads=spec.n_head, head_dim=hd, causal=True, scale=layer.scale, positions="none")
        o = sub("o", "linear", [att], D)
        h = op(p + "resid_attn", "add", [h, o], ("T", D), layer.modules["block"], i)
        m = sub("ln_mlp", "layer_norm", [h], D, eps=spec.eps)
        u = sub("mlp_in", "linear", [m], spec.d_ffn)
        act = op(p + "act", "activation", [u], ("T", spec.d_ffn), layer.modules["mlp_in"], i, fn=spec.activation)
        d = sub("mlp_out", "linear", [act], D)
        h = op(p + "resid_mlp", "add", [h, d], ("T", D), layer.modules["block"], i)
    f = op("ln_final", "layer_norm", [h], ("T", D), spec.final_norm_module, -1, "ln_final",
           spec.final_norm, eps=spec.eps)
    logits = op("logits", "lm_head", [f], ("T", spec.vocab), spec.unembed_module, -1,
                weights={"weight": spec.unembed})
    op("out", "output", [logits], ("T", spec.vocab), "", -1)
    return g
