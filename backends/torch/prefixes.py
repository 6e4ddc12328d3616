"""Prefix blocks: how aux weights become TinT input tokens, and back.

Every aux op with weights gets one block of prefix tokens, named after the op:
- a linear map W [Dout, Din] with bias b: K tokens; token j stacks the S = Dout/K rows
  r = s·K + j (s < S), each cut into C = Din/c chunks of width c; each chunk is followed
  by one coordinate, the row's bias after chunk 0 and 0 after the others; a one-hot of
  j ends the token and routes values by position:
      [W[j, 0:c], b[j], W[j, c:2c], 0, …, W[K+j, 0:c], b[K+j], …, onehot_K(j)]
  width S·C·(c+1) + K. Unit (s, ch) is what head (s, ch) of a linear forward reads.
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
    chunk: int  # c, the width of a row chunk (linear); 0 for a norm

    @property
    def chunks(self) -> int:
        return self.d_in // self.chunk if self.kind == "linear" else 0

    @property
    def units(self) -> int:
        """Row chunks per token: S·C."""
        return self.rows * self.chunks

    @property
    def width(self) -> int:
        if self.kind == "linear":
            return self.units * (self.chunk + 1) + self.tokens
        return 2 * self.d_out + 1

    def unit(self, s: int, ch: int) -> range:
        """Coordinates of chunk ch of row slot s, with its bias-or-zero coordinate last."""
        u = s * self.chunks + ch
        return range(u * (self.chunk + 1), (u + 1) * (self.chunk + 1))

    @property
    def onehot(self) -> range:
        return range(self.units * (self.chunk + 1), self.width)


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


def plan(graph: Graph) -> Layout:
    """One block per aux op with weights, shaped as the passes chose for the ops that read it
    (`prefixes`: K tokens, `head_width`: row chunks of c; K = Dout and c = Din if unset)."""
    blocks, by_ref = {}, {}
    vocab = positions = unembed = None
    offset = 0
    for node in graph.nodes():
        name = node.name.split("@")[0]  # the aux op: the same block at every step
        if node.kind == "embed":
            vocab = node.weights["table"]
        elif node.kind == "lm_head":
            unembed = node.weights["weight"]
        elif node.kind == "pos_embed":
            positions, offset = node.weights["table"], node.attrs["offset"]
        elif node.kind in ("linear", "layer_norm") and name not in blocks:
            refs = {slot: ref.at(0) for slot, ref in node.weights.items()}
            if node.kind == "linear":
                d_out, d_in = refs["weight"].shape(graph.weight_shapes[refs["weight"].name])
                k, c = node.attrs.get("prefixes", d_out), node.attrs.get("head_width", d_in)
                if d_out % k or d_in % c:
                    raise BackendError(f"node %{node.name}: {k} prefixes or head width {c} do not divide "
                                       f"its weight [{d_out}, {d_in}]")
                block = Block(name, "linear", refs, d_in, d_out, k, d_out // k, c)
            else:
                width = graph.weight_shapes[refs["gain"].name][0]
                block = Block(name, "layer_norm", refs, width, width, 1, 0, 0)
            blocks[name] = block
            for slot, ref in refs.items():
                by_ref[ref.key] = (name, slot)
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
            tokens[:, : block.units * (block.chunk + 1)] = _units(block, params)
            tokens[:, list(block.onehot)] = torch.eye(block.tokens, dtype=weight.dtype)
        else:
            d = block.d_out
            tokens[0, :d] = block.refs["gain"].resolve(params)
            tokens[0, d : 2 * d] = block.refs["bias"].resolve(params)
            tokens[0, 2 * d] = 1.0
        out[block.name] = tokens
    return out


def _units(block: Block, params) -> torch.Tensor:
    """[K, S·C·(c+1)]: the row chunks of a linear block, each followed by its bias or 0."""
    S, K, C, c = block.rows, block.tokens, block.chunks, block.chunk
    w = block.refs["weight"].resolve(params)  # [Dout, Din]
    units = torch.zeros(S, K, C, c + 1, dtype=w.dtype)
    units[..., :c] = w.reshape(S, K, C, c)
    if "bias" in block.refs:
        units[:, :, 0, c] = block.refs["bias"].resolve(params).reshape(S, K)
    return units.movedim(1, 0).reshape(K, S * C * (c + 1))


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
            S, K, C, c = block.rows, block.tokens, block.chunks, block.chunk
            units = tokens[..., : block.units * (c + 1)].reshape(*batch, K, S, C, c + 1)
            rows = units.movedim(-4, -3)  # [.., S, K, C, c+1]: row r = s·K + j
            put(block.refs["weight"], rows[..., :-1].reshape(*batch, block.d_out, block.d_in))
            if "bias" in block.refs:
                put(block.refs["bias"], rows[..., 0, -1].reshape(*batch, block.d_out))
        else:
            put(block.refs["gain"], tokens[..., 0, : block.d_out])
            put(block.refs["bias"], tokens[..., 0, block.d_out : 2 * block.d_out])
    missing = set(params) - written
    if missing:
        raise BackendError([f"parameter {n} is in no prefix block" for n in sorted(missing)], "cannot decode")
    return params
