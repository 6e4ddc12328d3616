"""Train-set selection: mark which weight slots of which ops SGD updates.

A parameter *kind* names a role and a slot: attn_q = the weight and bias of the q
linear, norm_gain = the gain of every layer norm in the layer, and so on. Only ops
inside the chosen aux layers are marked (embeddings and the final norm never train).
"""

from __future__ import annotations

from ir.errors import PassError

from ..graph import Graph, WeightRef
from . import PassResult

# kind -> (op roles, weight slots)
KINDS = {
    "attn_q": (("q",), ("weight", "bias")),
    "attn_k": (("k",), ("weight", "bias")),
    "attn_v": (("v",), ("weight", "bias")),
    "attn_o": (("o",), ("weight", "bias")),
    "mlp_in": (("mlp_in",), ("weight", "bias")),
    "mlp_out": (("mlp_out",), ("weight", "bias")),
    "mlp_gate": (("mlp_gate",), ("weight", "bias")),  # a gated MLP: act(gate) ⊙ up, then down
    "mlp_up": (("mlp_up",), ("weight", "bias")),
    "mlp_down": (("mlp_down",), ("weight", "bias")),
    # the norms on the stream: before each sublayer, or on its output before the residual add (OLMo 2)
    "norm_gain": (("ln_attn", "ln_mlp", "ln_attn_out", "ln_mlp_out"), ("gain",)),
    "norm_bias": (("ln_attn", "ln_mlp", "ln_attn_out", "ln_mlp_out"), ("bias",)),
    "qk_norm_gain": (("ln_q", "ln_k"), ("gain",)),  # RMSNorm of q and of k inside attention (OLMo 2)
}


def select_train(graph: Graph, layers: list[int], kinds: list[str]) -> PassResult:
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise PassError(f"unknown parameter kinds {unknown}; allowed: {', '.join(KINDS)}")
    present = kinds_of(graph)
    absent = [k for k in kinds if k not in present]
    if absent:  # e.g. norm_bias of an RMSNorm model, mlp_in of a gated MLP
        raise PassError(f"parameter kinds {absent} do not exist in this {graph.attrs.get('family', '')} model; "
                        f"allowed: {', '.join(present)}")
    out = graph.copy()
    changed = False
    for node in out.nodes():
        slots = set()
        for kind in kinds:
            roles, kind_slots = KINDS[kind]
            if node.attrs.get("layer") in layers and node.attrs.get("role") in roles:
                slots |= {s for s in kind_slots if s in node.weights}
        text = ",".join(s for s in node.weights if s in slots)
        if text and node.attrs.get("train") != text:
            node.attrs["train"] = text
            changed = True
        elif not text and "train" in node.attrs:
            del node.attrs["train"]
            changed = True
    return PassResult(out, changed)


def kinds_of(graph: Graph) -> list[str]:
    """The kinds that name at least one weight of a layer of this graph."""
    found = []
    for kind, (roles, slots) in KINDS.items():
        if any(n.attrs.get("layer", -1) >= 0 and n.attrs.get("role") in roles and set(slots) & set(n.weights)
               for n in graph.nodes()):
            found.append(kind)
    return found


def trained_refs(graph: Graph) -> list[WeightRef]:
    """The weights that SGD updates, in graph order (after select_train)."""
    refs = []
    for node in graph.nodes():
        for slot in filter(None, node.attrs.get("train", "").split(",")):
            refs.append(node.weights[slot])
    return refs
