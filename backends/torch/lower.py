"""Lowering: a training graph -> a program (backends/torch/program.py) of TinT layer calls
with constructed weights.

The TinT's token stream is [B, T, width]; every value of the training graph gets its
own field (a range of coordinates), written once by one call; backends/torch/allocate.py
then lets values whose lives do not overlap share coordinates.
Prefix blocks (backends/torch/prefixes.py) are the other streams: a TinT layer either
attends from tokens to a block (linear forward and backward), from a block to the
tokens (descent, which writes the block's next version), or among tokens.

A call applies one shared primitive to G groups (heads, or chunks of a wide value):
each group gathers its inputs from fields and adds its output to a field. Each op
kind has one method below. A primitive's weights depend only on its key (shapes and
settings), so identical keys share one module; nothing here reads an aux weight.
"""

from __future__ import annotations

import math
import re
from typing import Callable

import torch
from torch import nn

from ir.graph import Graph, Node
from ir.errors import BackendError
from ir.passes.autodiff import REMAT, phase_of

from . import runtime as P
from .low_rank import factorise
from .structured import compact
from .lower_backward import BackwardLowering
from .lower_llama import LlamaLowering
from .prefixes import Layout
from .stream_io import block_stream
from .program import TOKENS, Call, Field, Program, Read, Value, Write


OP_OF_KIND = {"add": "residual", "layer_norm": "norm", "rms_norm": "norm", "mul": "product", "linear": "linear", "activation": "activation",
              "attention": "attention", "attention_score": "attention", "loss_grad": "loss"}


def lower(graph: Graph, layout: Layout, max_length: int, dtype=torch.float32) -> Program:
    return _Lowering(graph, layout, max_length, dtype).run()


class _Lowering(BackwardLowering, LlamaLowering):
    def __init__(self, graph: Graph, layout: Layout, max_length: int, dtype):
        self.graph, self.layout, self.tmax, self.dtype = graph, layout, max_length, dtype
        self.share = graph.attrs.get("share_blocks", True)
        self.rank = graph.attrs.get("low_rank")
        self.low_rank_log: list[dict] = []
        self.steps = graph.attrs["steps"]
        self.width = 0
        self.values: list[Value] = []  # every token value allocated, in order
        self.node: Node | None = None
        self.calls: list[Call] = []
        self.layers: dict[str, nn.Module] = {}
        self.fields: dict[str, Field] = {}  # training-graph value -> its field
        self.memo: dict[tuple, Field] = {}  # derived values computed once (x̂, copied γ/β, shifts)
        self.block_version: dict[str, int] = {b: 0 for b in layout.blocks}
        # the tables' widths: OPT-350m's embeddings (and head) are narrower than its stream
        width = lambda ref: ref.shape(graph.weight_shapes[ref.name])[1]  # noqa: E731
        widths = {"one": 1, "zero": 1, "positions": max_length, "train": 1, "label": 1, "lr": 1,
                  "token_embed": width(layout.vocab)}
        if layout.positions is not None:
            widths["pos_embed"] = width(layout.positions)
        if not layout.tied:
            widths["target_embed"] = width(layout.unembed)  # unembed[z]: the loss's target rows
        self.inputs = {name: self.alloc(n, f"input {name}") for name, n in widths.items()}
        self.logits: Field | None = None
        self.logit_softcap: float | None = None

    # -- bookkeeping ---------------------------------------------------------------------
    def alloc(self, width: int, name: str | None = None) -> Field:
        """A new value's field; the value is named for the training-graph op being lowered."""
        f = Field(self.width, width)
        self.width += width
        self.values.append(Value(name or f"%{self.node.name}", f))
        return f

    def eye(self, n: int) -> torch.Tensor:
        return torch.eye(n, dtype=self.dtype)

    def layer(self, key: tuple, build: Callable[[], nn.Module]) -> str:
        """The shared primitive of this construction key (without block sharing: one per call)."""
        if not self.share:
            key = (*key, "call", len(self.calls))
        name = re.sub(r"[^0-9a-zA-Z_]", "_", "_".join(str(k) for k in key))
        if name not in self.layers:
            self.layers[name] = build()
            compact(self.layers[name])
            if self.rank is not None:
                self.low_rank_log += factorise(name, self.layers[name], self.rank)
        return name

    def call(self, layer: str, reads: list, out: list[Field] | Write) -> None:
        """reads: per primitive input, a Read or a list of per-group field tuples (token stream)."""
        reads = tuple(r if isinstance(r, Read) else Read(TOKENS, tuple(tuple(g) for g in r)) for r in reads)
        write = out if isinstance(out, Write) else Write(TOKENS, tuple(out))
        node = self.node
        self.calls.append(Call(layer, reads, write, node.name, self._op(node), phase_of(node, self.steps)))

    def new(self, width: int, group: int) -> tuple[Field, list[Field]]:
        """A fresh field and its chunks of `group` width (the groups' output fields)."""
        f = self.alloc(width)
        return f, f.chunks(group)

    def group(self, width: int) -> int:
        """The chunk width for elementwise work on a value of `width`: the op's `group_width`
        (passes/sub_mlp.py) where it divides, else one chunk."""
        g = self.node.attrs.get("group_width", width)
        return g if width % g == 0 else width

    @staticmethod
    def _op(node: Node) -> str:
        kind = node.kind.removesuffix("_backward").removesuffix("_descent")
        return OP_OF_KIND.get(kind, kind)

    def block_of(self, node: Node) -> tuple[str, int]:
        """The prefix block holding a node's weights, and the version to read (the newest it reads)."""
        blocks = {self.layout.by_ref[ref.key][0] for ref in node.weights.values()}
        if len(blocks) != 1:
            raise BackendError(f"node %{node.name}: reads weights of {len(blocks)} prefix blocks; expected one")
        return blocks.pop(), max(ref.version for ref in node.weights.values())

    @staticmethod
    def block_read(block: str, version: int, groups: list[range]) -> Read:
        return Read(block_stream(block, version), tuple((Field(r.start, len(r)),) for r in groups))

    # -- the driver ----------------------------------------------------------------------
    def run(self) -> Program:
        phase, remaking = None, False
        for node in self.graph.nodes():
            self.node = node
            now = phase_of(node, self.steps) if "@" in node.name else phase  # the inputs and masks have no step
            remade = REMAT in node.name
            if (now in ("forward", "eval") and phase in ("backward", "descent")) or (remade and not remaking):
                # each forward pass (the next step's, the evaluation, a layer's recomputation) derives its
                # own x̂, γ/β copies and tables: one kept from the last would sit in the stream through a
                # whole backward pass
                self.memo.clear()
            phase, remaking = now, remade
            method = getattr(self, "lower_" + node.kind, None)
            if method is None:
                raise BackendError(f"node %{node.name}: op kind {node.kind!r} has no TinT construction")
            method(node)
        final = {b: block_stream(b, v) for b, v in self.block_version.items()}
        return Program(self.width, self.tmax, self.inputs, self.calls, self.layers, self.logits, final, self.layout,
                       self.values, self.low_rank_log, self.rank is not None, self.graph.attrs["lr"],
                       self.logit_softcap)

    def x(self, node: Node, i: int = 0) -> Field:
        return self.fields[node.inputs[i]]

    # -- inputs and embeddings: fields the input layer fills --------------------------
    def lower_input(self, node):
        pass  # token ids are read by the input layer

    def lower_mask(self, node):
        self.fields[node.name] = self.inputs[node.attrs["which"]]

    def lower_embed(self, node):
        rows = self.inputs["token_embed"]  # Gemma 2 scales them by √D: a linear map
        self.fields[node.name] = self._scaled(rows, node.attrs["scale"]) if "scale" in node.attrs else rows

    def lower_pos_embed(self, node):
        self.fields[node.name] = self.inputs["pos_embed"]

    # -- elementwise constructions, in chunks of the group width -----------------------
    def _chunked_linear(self, name: str, weight: Callable[[int], torch.Tensor], *values: Field,
                        group: int | None = None) -> Field:
        """out = W·[a; b; …] chunk by chunk: W is built for one chunk (width g per value; `group` overrides
        the op's group width)."""
        g = group or self.group(values[0].width)
        layer = self.layer((name, g), lambda: P.Linear(weight(g)))
        out, chunks = self.new(values[0].width, g)
        self.call(layer, [list(zip(*(v.chunks(g) for v in values)))], chunks)
        return out

    def _sum(self, a: Field, b: Field) -> Field:
        return self._chunked_linear("sum", lambda g: torch.cat([self.eye(g)] * 2, 1), a, b)

    def _difference(self, a: Field, b: Field, group: int | None = None) -> Field:
        return self._chunked_linear("difference", lambda g: torch.cat([self.eye(g), -self.eye(g)], 1), a, b,
                                    group=group)

    def _scaled(self, a: Field, factor: float) -> Field:
        return self._chunked_linear(f"scale_{factor!r}", lambda g: factor * self.eye(g), a)

    def _product(self, a: Field, b: Field, group: int | None = None, factor: float = 1.0) -> Field:
        """factor·a ⊙ b chunk by chunk (`group` overrides the op's group width); a of width 1 is broadcast
        over b, a narrower a (a gain shared by b's heads) repeats along b."""
        g = group or self.group(b.width)
        if 1 < a.width < b.width:
            g = math.gcd(g, a.width)
        left = (lambda: torch.ones(g, 1, dtype=self.dtype)) if a.width == 1 else (lambda: self.eye(g))
        key = ("product", a.width == 1, g) + (() if factor == 1.0 else (repr(factor),))
        layer = self.layer(key, lambda: P.Gate(factor * left(), self.eye(g)))
        a_chunks = [a] * (b.width // g) if a.width == 1 else a.chunks(g) * (b.width // a.width)
        out, chunks = self.new(b.width, g)
        self.call(layer, [[(c,) for c in a_chunks], [(c,) for c in b.chunks(g)]], chunks)
        return out

    def _normalised(self, x: Field, eps: float) -> Field:
        key = ("normalised", x, eps)
        if key not in self.memo:
            out = self.alloc(x.width)
            self.call(self.layer(("norm", repr(eps)), lambda: P.Norm(eps)), [[(x,)]], [out])
            self.memo[key] = out
        return self.memo[key]

    def _gained(self, node, y: Field, bias: bool = False) -> Field:
        """γ⊙y (+ β with `bias`), read from the norm's prefix token [γ, β, 1] by linear attention: one head
        per coordinate i scores ⟨[y_i, 1], [γ_i, β_i]⟩ (⟨y_i, γ_i⟩ without β) against the token, whose
        constant 1 is the value, so the score is the output. γ is never copied into the stream (a copy of
        [γ, β] beside x̂ set the width of the narrowest standard view). A gain offset c (Gemma 2's 1 + w;
        the token holds w) makes the key w_i + c·1, rounded as HF's (1 + w). A norm of each head: γ
        repeats along y. A chunk's g heads share one group (Attention(heads=g)). From the block's current
        version: it holds the γ and β of the one the op names (a trained slot changes only after the
        backward of the step that reads it), and only the current one may be read."""
        block = self.block_of(node)[0]
        version = self.block_version[block]
        d = self.layout.blocks[block].d_out
        g = math.gcd(self.group(y.width), d)
        offset = node.attrs.get("gain_offset")
        eye, rows = self.eye(g), [range(i % d, i % d + g) for i in range(0, y.width, g)]
        if bias:  # head j: q = [y_j, 1], k = [γ_j, β_j]
            w_q = torch.zeros(2 * g, g + 1, dtype=self.dtype)
            w_q[0::2, :g], w_q[1::2, g] = eye, 1.0
            w_k = torch.zeros(2 * g, 2 * g, dtype=self.dtype)
            w_k[0::2, :g], w_k[1::2, g:] = eye, eye
            queries = [(part, self.inputs["one"]) for part in y.chunks(g)]
            keys = [(Field(r.start, g), Field(d + r.start, g)) for r in rows]
        else:  # head j: q = y_j, k = γ_j (+ c·1)
            w_q = eye
            w_k = eye if offset is None else torch.cat([eye, torch.full((g, 1), offset, dtype=self.dtype)], 1)
            queries = [(part,) for part in y.chunks(g)]
            keys = [(Field(r.start, g),) + (() if offset is None else (Field(2 * d, 1),)) for r in rows]
        key = ("gain", g, bias) + (() if offset is None else (repr(offset),))
        layer = self.layer(key, lambda: P.Attention(w_q, w_k, torch.ones(g, 1, dtype=self.dtype), eye,
                                                    softmax=False, mask="full", heads=g))
        out, chunks = self.new(y.width, g)
        constant = self.block_read(block, version, [range(2 * d, 2 * d + 1)] * len(chunks))
        self.call(layer, [queries, Read(block_stream(block, version), tuple(keys)), constant], chunks)
        return out

    # -- forward ops ---------------------------------------------------------------------
    def lower_add(self, node):
        self.fields[node.name] = self._sum(self.x(node, 0), self.x(node, 1))

    def lower_layer_norm(self, node):
        xhat = self._normalised(self.x(node), node.attrs["eps"])
        self.fields[node.name] = self._gained(node, xhat, bias=True)

    def _one_or_zero(self, chunk: int) -> Field:
        """The bias input of row chunk `chunk`: 1 for the first chunk, 0 for the others."""
        return self.inputs["one"] if chunk == 0 else self.inputs["zero"]

    def lower_linear(self, node):
        block, version = self.block_of(node)
        self.fields[node.name] = self._linear_forward(block, version, self.x(node))

    def _linear_forward(self, block: str, version: int, x: Field) -> Field:
        """y = W x + b: head (s, ch) scores ⟨[x_ch; 1 or 0], [W[sK+j]_ch; b or 0]⟩ against each prefix
        token j and routes it by j's one-hot to y[sK+j]; the chunks' heads add up."""
        b = self.layout.blocks[block]
        S, K, C, c = b.rows, b.tokens, b.chunks, b.chunk
        layer = self.layer(("linear_forward", c, K), lambda: P.Attention(
            self.eye(c + 1), self.eye(c + 1), self.eye(K), self.eye(K), softmax=False, mask="full",
            positional="values"))
        heads = [(s, ch) for s in range(S) for ch in range(C)]
        out = self.alloc(b.d_out)
        self.call(layer, [
            [(x.part(ch * c, c), self._one_or_zero(ch)) for s, ch in heads],
            self.block_read(block, version, [b.unit(s, ch) for s, ch in heads]),
            self.block_read(block, version, [b.onehot] * len(heads))],
            [out.part(s * K, K) for s, ch in heads])
        return out

    def lower_activation(self, node):
        self.fields[node.name] = self._activated(self.x(node), node.attrs["fn"])

    def _activated(self, x: Field, fn: str, scale: float = 1.0) -> Field:
        """fn(scale·x), chunk by chunk: an MLP."""
        g = self.group(x.width)
        key = ("activation", fn, g) + (() if scale == 1.0 else (repr(scale),))
        layer = self.layer(key, lambda: P.MLP(scale * self.eye(g), self.eye(g), fn))
        out, chunks = self.new(x.width, g)
        self.call(layer, [[(c,) for c in x.chunks(g)]], chunks)
        return out

    def lower_attention(self, node):
        """Softmax attention per query head; with rope it reads the rotated q and k, with alibi q and k
        with one more coordinate each, and query head h reads k/v head h // (heads/kv_heads) (grouped-query)."""
        a = node.attrs
        hd = a["head_dim"]
        v = self.x(node, 2).chunks(hd)
        if "softcap" in a:  # Gemma 2: a softmax over the capped scores, stored (lower_llama.py)
            heads = [(v[self._kv_head(a, i)],) for i in range(a["heads"])]
            self.fields[node.name] = self._capped_softmax(node, heads, hd)
            return
        queries, keys, w_q, w_k, suffix = self._score_inputs(node)  # rope, alibi
        layer = self.layer(("attention", hd, repr(a["scale"])) + suffix, lambda: P.Attention(
            w_q, w_k, self.eye(hd), self.eye(hd), softmax=True, mask="causal"))
        out, chunks = self.new(self.x(node).width, hd)
        self.call(layer, [queries, keys, [(v[self._kv_head(a, h)],) for h in range(len(queries))]], chunks)
        self.fields[node.name] = out

    def lower_lm_head(self, node):
        self.logits = self.x(node)  # the TinT's output head reads it with the unembedding
        self.logit_softcap = node.attrs.get("softcap")  # and caps it as the aux model's head does

    def lower_output(self, node):
        pass

    # -- descent ops: a block's next version -------------------------------------------
    def _next_version(self, block: str, version: int) -> tuple[str, int]:
        if self.block_version[block] != version:
            raise BackendError(f"node %{self.node.name}: block {block} is at version {self.block_version[block]}, "
                               f"the descent expects {version}")
        self.block_version[block] = version + 1
        return block_stream(block, version), version + 1

    def _times_lr(self, f: Field) -> Field:
        """η⊙f, η the learning rate the input layer writes at every token (one gated unit per coordinate);
        computed once per value, as descents that read the same x share it."""
        key = ("times_lr", f)
        if key not in self.memo:
            self.memo[key] = self._product(self.inputs["lr"], f)
        return self.memo[key]

    def lower_linear_descent(self, node):
        """W[r] −= η Σ_t ∂y_t[r]·x_t, b[r] −= η Σ_t ∂y_t[r]: the K prefix tokens query the tokens;
        head (s, ch) scores ∂y_t[sK+j] and adds −[x_t,ch; 1 or 0] to unit (s, ch). η is an input
        (stream_io.input_layer), so one factor carries it: η⊙x and the bias slot's η, or η⊙∂y, whichever
        is narrower (η⊙x is free where another descent already made it: q, k and v read one x)."""
        block, version = self.block_of(node)
        b = self.layout.blocks[block]
        S, K, C, c = b.rows, b.tokens, b.chunks, b.chunk
        has_w, has_b = "weight" in node.weights, "bias" in node.weights
        x, dy = self.x(node, 0), self.x(node, 1)
        if not has_w or ("times_lr", x) in self.memo or x.width <= dy.width:
            x = self._times_lr(x) if has_w else x  # without W the x part is multiplied by 0 (keep)
            one = self.inputs["lr"]
        else:
            dy, one = self._times_lr(dy), self.inputs["one"]
        keep = torch.tensor([1.0 if has_w else 0.0] * c + [1.0 if has_b else 0.0], dtype=self.dtype)
        layer = self.layer(("linear_descent", c, K, has_w, has_b), lambda: P.Attention(
            self.eye(K), self.eye(K), -torch.diag(keep), self.eye(c + 1), softmax=False, mask="full",
            positional="queries"))
        heads = [(s, ch) for s in range(S) for ch in range(C)]
        base, new = self._next_version(block, version)
        units = [b.unit(s, ch) for s, ch in heads]
        self.call(layer, [
            self.block_read(block, version, [b.onehot] * len(heads)),
            [(dy.part(s * K, K),) for s, ch in heads],
            [(x.part(ch * c, c), one if ch == 0 else self.inputs["zero"]) for s, ch in heads]],
            Write(block_stream(block, new), tuple(Field(u.start, len(u)) for u in units), base))

    def lower_layer_norm_descent(self, node):
        self._norm_descent(node, self._normalised)

    def _norm_descent(self, node, normalised):
        """γ −= η Σ_t ∂y_t⊙x̂_t, β −= η Σ_t ∂y_t (x̂ = normalised(x, ε)): the norm's prefix token attends
        to every token with score η (its constant 1 against the tokens' η) and adds −1 times their
        values, one head per chunk."""
        a = node.attrs
        block, version = self.block_of(node)
        x, dy = self.x(node, 0), self.x(node, 1)
        d = self.layout.blocks[block].d_out  # x's width, or one head's (a norm of each head: their sum)
        g = math.gcd(self.group(x.width), d)
        values, targets = [], []
        for slot, at in (("gain", 0), ("bias", d)):
            if slot in node.weights:
                value = self._product(dy, normalised(x, a["eps"])) if slot == "gain" else dy
                values += value.chunks(g)
                targets += [Field(at + i % d, g) for i in range(0, x.width, g)]
        one = torch.ones(1, 1, dtype=self.dtype)
        layer = self.layer(("norm_descent", g), lambda: P.Attention(
            one, one, -self.eye(g), self.eye(g), softmax=False, mask="full"))
        base, new = self._next_version(block, version)
        heads = len(values)
        self.call(layer, [self.block_read(block, version, [range(2 * d, 2 * d + 1)] * heads),
                          [(self.inputs["lr"],)] * heads, [(v,) for v in values]],
                  Write(block_stream(block, new), tuple(targets), base))
