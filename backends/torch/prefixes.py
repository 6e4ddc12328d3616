"""Prefix blocks: how aux weights become TinT input tokens, and back.

Every aux op with weights gets one block of prefix tokens, named after the op:
- a linear map W [Dout, Din] with bias b: K tokens; token j stacks the S = Dout/K rows
  r = s·K + j (s < S), each cut into C = Din/c chunks of width c; each chunk is followed
  by one coordinate, the row's bias after chunk 0 and 0 after the others; a one-hot of
  j ends the token and routes values by position:
      [W[j, 0:c], b[j], W[j, c:2c], 0, …, W[K+j, 0:c], b[K+j], …, onehot_K(j)]
  width S·C·(c+1) + K. Unit (s, ch) is what head (s, ch) of a linear forward reads.
- a layer norm with gain γ and bias β: one token [γ, β, 1], width 2D + 1 (an RMSNorm too,
  with β = 0: block kind "layer_norm" holds both norms).
- a soft-capped head (Gemma 2's final logits): the unembedding once more as a linear block of one row
  per token (K = V, S = 1, c = D): its one-hot is the vocabulary index that the capped loss gradient's
  softmax over the stored logits keys on (backends/torch/lower_backward.py); V·(V + D + 1) numbers.
The token embedding table ("vocab"), the position table ("positions", where the model has one) and, when not
tied to the vocab, the LM head ("unembed") are inputs too: the TinT reuses them for
its own input and output.
`plan` shapes the blocks; the runtime's `encode(θ)` builds them from `layout_json` and
`decode(blocks)` returns θ in Hugging Face names.
"""

from __future__ import annotations

from dataclasses import dataclass

from ir.graph import Graph, WeightRef
from ir.errors import BackendError
from ir.passes.autodiff import aux_op


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
    positions: WeightRef | None  # None: no learned position table (rotary positions)
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
        name = aux_op(node.name)  # the same block at every step and in a recomputation
        if node.kind == "embed":
            vocab = node.weights["table"]
        elif node.kind == "lm_head":
            unembed = node.weights["weight"]
        elif node.kind == "loss_grad" and "softcap" in node.attrs and node.attrs["module"] not in blocks:
            ref = node.weights["weight"].at(0)
            vocab_size, d = ref.shape(graph.weight_shapes[ref.name])
            name = node.attrs["module"]  # the head's module: its logits, capped
            blocks[name] = Block(name, "linear", {"weight": ref}, d, vocab_size, vocab_size, 1, d)
            by_ref[ref.key] = (name, "weight")
        elif node.kind == "pos_embed":
            positions, offset = node.weights["table"], node.attrs["offset"]
        elif node.kind in ("linear", "layer_norm", "rms_norm") and name not in blocks:
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


def layout_json(layout: Layout) -> dict:
    """The layout as plain data: what the runtime's encoder and decoder (and tint_config.json) read."""
    def ref(r: WeightRef | None) -> dict | None:
        if r is None:
            return None
        out = {"name": r.name, "transpose": r.transpose, "rows": list(r.rows) if r.rows is not None else None}
        return out | ({"period": r.period} if r.period else {}) \
            | ({"cols": list(r.cols)} if r.cols else {})  # only where set: older layouts keep their bytes

    blocks = {name: {"kind": b.kind, "refs": {slot: ref(r) for slot, r in b.refs.items()}, "d_in": b.d_in,
                     "d_out": b.d_out, "tokens": b.tokens, "rows": b.rows, "chunk": b.chunk, "width": b.width}
              for name, b in layout.blocks.items()}
    return {"vocab": ref(layout.vocab), "positions": ref(layout.positions), "unembed": ref(layout.unembed),
            "tied": layout.tied, "position_offset": layout.position_offset,
            "shapes": {name: list(shape) for name, shape in layout.shapes.items()}, "blocks": blocks}
