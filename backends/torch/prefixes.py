"""Prefix blocks: how aux weights become TinT input tokens, and back.

Every aux op with weights gets one block of prefix tokens, named after the op:
- a linear map W [Dout, Din] with bias b: K tokens; token j stacks S = Dout/K rows,
  each followed by its bias, then a one-hot of j that routes values by position:
      [W[jS], b[jS], W[jS+1], b[jS+1], …, W[jS+S−1], b[jS+S−1], onehot_K(j)]   width S·(Din+1) + K
- a layer norm with gain γ and bias β: one token [γ, β, 1], width 2D + 1.
The token embedding table ("vocab"), the position table ("positions") and, when not
tied to the vocab, the LM head ("unembed") are inputs too: the TinT reuses them for
its own input and output.
`encode(θ)` builds the blocks; `decode(blocks)` returns θ in Hugging Face names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ir.graph import Graph, WeightRef
from tintc.errors import BackendError


@dataclass(frozen=True)
class Block:
    name: str  # the aux op's name in the traced graph
    kind: str  # "linear" | "layer_norm"
    refs: dict  # slot -> WeightRef (version 0)
    d_in: int
    d_out: int
    tokens: int  # K
    rows: int  # S, rows per token (linear); 0 for a norm

    @property
    def width(self) -> int:
        if self.kind == "linear":
            return self.rows * (self.d_in + 1) + self.tokens
        return 2 * self.d_out + 1

    def slot(self, s: int) -> range:
        """Coordinates of row slot s (its weight row then its bias) in a linear block."""
        return range(s * (self.d_in + 1), (s + 1) * (self.d_in + 1))

    @property
    def onehot(self) -> range:
        return range(self.rows * (self.d_in + 1), self.width)


@dataclass
class Layout:
    blocks: dict[str, Block]
    by_ref: dict[tuple, tuple[str, str]]  # weight key -> (block, slot)
    vocab: WeightRef
    positions: WeightRef
    position_offset: int
    unembed: WeightRef  # the LM head's matrix: the vocab table itself when embeddings are tied
    shapes: dict[str, tuple[int, ...]]  # every aux parameter's shape (HF names)

    @property
    def tied(self) -> bool:
        return self.unembed.key == self.vocab.key


def plan(graph: Graph, prefixes: int) -> Layout:
    """One block per aux op with weights; errors name every op whose width K does not divide."""
    blocks, by_ref, problems = {}, {}, []
    vocab = positions = unembed = None
    offset = 0
    for node in graph.nodes():
        if node.kind == "embed":
            vocab = node.weights["table"]
        elif node.kind == "lm_head":
            unembed = node.weights["weight"]
        elif node.kind == "pos_embed":
            positions, offset = node.weights["table"], node.attrs["offset"]
        elif node.kind in ("linear", "layer_norm"):
            refs = {slot: ref.at(0) for slot, ref in node.weights.items()}
            if node.kind == "linear":
                d_out, d_in = refs["weight"].shape(graph.weight_shapes[refs["weight"].name])
                if d_out % prefixes:
                    problems.append(f"node %{node.name} ({node.attrs.get('module')}): output width {d_out} is not "
                                    f"divisible by tint.prefixes={prefixes}; allowed: a K dividing every linear width")
                    continue
                block = Block(node.name, "linear", refs, d_in, d_out, prefixes, d_out // prefixes)
            else:
                width = graph.weight_shapes[refs["gain"].name][0]
                block = Block(node.name, "layer_norm", refs, width, width, 1, 0)
            blocks[node.name] = block
            for slot, ref in refs.items():
                by_ref[ref.key] = (node.name, slot)
    if problems:
        raise BackendError(problems, headline="cannot lay out prefixes")
    return Layout(blocks, by_ref, vocab, positions, offset, unembed, dict(graph.weight_shapes))


def encode(layout: Layout, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """θ (HF names) -> {block name: [K, width]} plus "vocab" [V, D] and "positions" [P, D]."""
    out = {"vocab": layout.vocab.resolve(params).detach().clone(),
           "positions": layout.positions.resolve(params).detach().clone()}
    if not layout.tied:
        out["unembed"] = layout.unembed.resolve(params).detach().clone()
    for block in layout.blocks.values():
        weight = next(iter(block.refs.values())).resolve(params)
        tokens = torch.zeros(block.tokens, block.width, dtype=weight.dtype)
        if block.kind == "linear":
            w = block.refs["weight"].resolve(params)  # [Dout, Din]
            b = block.refs["bias"].resolve(params) if "bias" in block.refs else torch.zeros(block.d_out, dtype=w.dtype)
            rows = torch.cat([w, b[:, None]], 1).view(block.tokens, block.rows * (block.d_in + 1))
            tokens[:, : rows.shape[1]] = rows
            tokens[:, list(block.onehot)] = torch.eye(block.tokens, dtype=w.dtype)
        else:
            d = block.d_out
            tokens[0, :d] = block.refs["gain"].resolve(params)
            tokens[0, d : 2 * d] = block.refs["bias"].resolve(params)
            tokens[0, 2 * d] = 1.0
        out[block.name] = tokens
    return out


def decode(layout: Layout, prefixes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Blocks -> θ in HF names. Batched blocks ([B, K, width], one θ per sequence) give [B, *shape]."""
    batch = prefixes[next(iter(layout.blocks))].shape[:-2]
    dtype = prefixes["vocab"].dtype
    params = {name: torch.empty(*batch, *shape, dtype=dtype) for name, shape in layout.shapes.items()}
    written = set()

    def put(ref: WeightRef, value):
        view = params[ref.name].transpose(-1, -2) if ref.transpose else params[ref.name]
        if ref.rows is not None:
            view = view[..., ref.rows[0] : ref.rows[1], :] if view.dim() - len(batch) == 2 else \
                view[..., ref.rows[0] : ref.rows[1]]
        view.copy_(value)
        written.add(ref.name)

    put(layout.vocab, prefixes["vocab"])
    put(layout.positions, prefixes["positions"])
    if not layout.tied:
        put(layout.unembed, prefixes["unembed"])
    for block in layout.blocks.values():
        tokens = prefixes[block.name]
        if block.kind == "linear":
            rows = tokens[..., : block.rows * (block.d_in + 1)].reshape(*batch, block.d_out, block.d_in + 1)
            put(block.refs["weight"], rows[..., :-1])
            if "bias" in block.refs:
                put(block.refs["bias"], rows[..., -1])
        else:
            put(block.refs["gain"], tokens[..., 0, : block.d_out])
            put(block.refs["bias"], tokens[..., 0, block.d_out : 2 * block.d_out])
    missing = set(params) - written
    if missing:
        raise BackendError([f"parameter {n} is in no prefix block" for n in sorted(missing)], "cannot decode")
    return params
