"""Lowering: a training graph -> a program of TinT layer calls with constructed weights.

The TinT's token stream is [B, T, width]; every value of the training graph gets its
own field (a range of coordinates) in it, written once by adding a delta into zeros.
Prefix blocks (backends/torch/prefixes.py) are the other streams: a TinT layer either
attends from tokens to a block (linear forward and backward), from a block to the
tokens (descent, which writes the block's next version), or among tokens.

Each op kind has one method below; each emits calls of shared primitives: the weights
of a primitive depend only on its key (shapes and settings), so identical keys share one
module (block sharing), and nothing here ever reads an aux weight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ir.graph import Graph, Node
from tintc.errors import BackendError

from . import primitives as P
from .prefixes import Layout

TOKENS = "tokens"


@dataclass(frozen=True)
class Field:
    start: int
    width: int

    @property
    def stop(self) -> int:
        return self.start + self.width

    def part(self, offset: int, width: int) -> "Field":
        return Field(self.start + offset, width)


@dataclass(frozen=True)
class Read:
    stream: str  # "tokens", "unembed", or a prefix block version "h0.q@1"
    fields: tuple[Field, ...] = ()  # gathered in order; () = the whole stream


@dataclass(frozen=True)
class Call:
    layer: str  # the shared primitive in Program.layers
    reads: tuple[Read, ...]  # one per primitive input
    write: Read  # one field of one stream receives the delta
    base: str | None  # a new block version starts as a copy of this one
    node: str  # the training-graph op this call simulates
    op: str  # linear | activation | attention | norm | loss | residual
    phase: str  # forward | backward | descent | eval


@dataclass
class Program:
    width: int  # D_sim: the token stream's width
    max_length: int  # T_max: the longest input (one-hot positions)
    inputs: dict[str, Field]  # the input layer's fields
    calls: list[Call]
    layers: dict[str, nn.Module]  # shared primitives by name
    logits: Field  # the evaluation's final hidden state, read by the output head
    final_blocks: dict[str, str]  # block -> the stream of its last version
    layout: Layout


OP_OF_KIND = {"add": "residual", "layer_norm": "norm", "linear": "linear", "activation": "activation",
              "attention": "attention", "loss_grad": "loss"}


def lower(graph: Graph, layout: Layout, max_length: int, dtype=torch.float32) -> Program:
    return _Lowering(graph, layout, max_length, dtype).run()


def _eye(n, dtype):
    return torch.eye(n, dtype=dtype)


def _stack(blocks, dim=0):
    return torch.cat(blocks, dim)


class _Lowering:
    def __init__(self, graph: Graph, layout: Layout, max_length: int, dtype):
        self.graph, self.layout, self.tmax, self.dtype = graph, layout, max_length, dtype
        self.steps = graph.attrs["steps"]
        self.width = 0
        self.calls: list[Call] = []
        self.layers: dict[str, nn.Module] = {}
        self.fields: dict[str, Field] = {}  # training-graph value -> its field
        self.memo: dict[tuple, Field] = {}  # derived values computed once (x̂, copied γ/β, shifts)
        self.block_version: dict[str, int] = {b: 0 for b in layout.blocks}
        d = graph.attrs["d_model"]
        self.inputs = {"one": self.alloc(1), "positions": self.alloc(max_length), "train": self.alloc(1),
                       "label": self.alloc(1), "token_embed": self.alloc(d), "pos_embed": self.alloc(d)}
        if not layout.tied:
            self.inputs["target_embed"] = self.alloc(d)  # unembed[z]: the loss's target rows
        self.node: Node | None = None
        self.logits: Field | None = None

    # -- bookkeeping ---------------------------------------------------------------------
    def alloc(self, width: int) -> Field:
        f = Field(self.width, width)
        self.width += width
        return f

    def layer(self, key: tuple, build: Callable[[], nn.Module]) -> str:
        name = re.sub(r"[^0-9a-zA-Z_]", "_", "_".join(str(k) for k in key))
        if name not in self.layers:
            self.layers[name] = build()
        return name

    def call(self, layer: str, reads, width: int | None = None, write: Read | None = None,
             base: str | None = None) -> Field | None:
        out = None
        if write is None:
            out = self.alloc(width)
            write = Read(TOKENS, (out,))
        node = self.node
        self.calls.append(Call(layer, tuple(reads), write, base, node.name, self._op(node), self._phase(node)))
        return out

    def _phase(self, node: Node) -> str:
        if node.kind.endswith("_descent"):
            return "descent"
        if node.kind.endswith("_backward") or node.kind == "loss_grad" or ".grad" in node.name:
            return "backward"
        step = int(node.name.rsplit("@", 1)[1])
        return "eval" if step == self.steps else "forward"

    @staticmethod
    def _op(node: Node) -> str:
        kind = node.kind.removesuffix("_backward").removesuffix("_descent")
        return OP_OF_KIND.get(kind, kind)

    def tok(self, *fields: Field) -> Read:
        return Read(TOKENS, tuple(fields))

    def block_of(self, node: Node) -> tuple[str, int]:
        """The prefix block holding a node's weights, and the version to read (the newest it reads)."""
        blocks = {self.layout.by_ref[ref.key][0] for ref in node.weights.values()}
        if len(blocks) != 1:
            raise BackendError(f"node %{node.name}: reads weights of {len(blocks)} prefix blocks; expected one")
        return blocks.pop(), max(ref.version for ref in node.weights.values())

    def block_read(self, block: str, version: int, coords: range) -> Read:
        return Read(f"{block}@{version}", (Field(coords.start, len(coords)),))

    # -- the driver ----------------------------------------------------------------------
    def run(self) -> Program:
        for node in self.graph.nodes():
            self.node = node
            method = getattr(self, "lower_" + node.kind, None)
            if method is None:
                raise BackendError(f"node %{node.name}: op kind {node.kind!r} has no TinT construction")
            method(node)
        final = {b: f"{b}@{v}" for b, v in self.block_version.items()}
        return Program(self.width, self.tmax, self.inputs, self.calls, self.layers, self.logits, final, self.layout)

    def x(self, node: Node, i: int = 0) -> Field:
        return self.fields[node.inputs[i]]

    # -- inputs and embeddings: fields the input layer fills --------------------------
    def lower_input(self, node):
        pass  # token ids are read by the input layer

    def lower_mask(self, node):
        self.fields[node.name] = self.inputs[node.attrs["which"]]

    def lower_embed(self, node):
        self.fields[node.name] = self.inputs["token_embed"]

    def lower_pos_embed(self, node):
        self.fields[node.name] = self.inputs["pos_embed"]

    # -- shared constructions ------------------------------------------------------------
    def _linear_map(self, name: str, weight_fn, width_in: int, reads, width_out: int) -> Field:
        layer = self.layer((name, width_in, width_out), lambda: P.Linear(weight_fn()))
        return self.call(layer, [reads], width_out)

    def _sum(self, a: Field, b: Field) -> Field:
        d = a.width
        return self._linear_map("sum", lambda: _stack([_eye(d, self.dtype)] * 2, 1), 2 * d, self.tok(a, b), d)

    def _difference(self, a: Field, b: Field) -> Field:
        d, e = a.width, _eye(a.width, self.dtype)
        return self._linear_map("difference", lambda: _stack([e, -e], 1), 2 * d, self.tok(a, b), d)

    def _scaled(self, a: Field, factor: float) -> Field:
        d = a.width
        layer = self.layer(("scale", d, repr(factor)), lambda: P.Linear(factor * _eye(d, self.dtype)))
        return self.call(layer, [self.tok(a)], d)

    def _normalised(self, x: Field, eps: float) -> Field:
        key = ("normalised", x, eps)
        if key not in self.memo:
            self.memo[key] = self.call(self.layer(("norm", repr(eps)), lambda: P.Norm(eps)), [self.tok(x)], x.width)
        return self.memo[key]

    def _product(self, a: Field, b: Field) -> Field:
        """a ⊙ b, with a of width 1 broadcast over b."""
        d = b.width
        ga = torch.ones(d, a.width, dtype=self.dtype) if a.width == 1 else _eye(d, self.dtype)
        layer = self.layer(("product", a.width, d), lambda: P.Gate(ga, _eye(d, self.dtype)))
        return self.call(layer, [self.tok(a), self.tok(b)], d)

    def _norm_params(self, block: str, version: int) -> tuple[Field, Field]:
        """Copy a layer norm's [γ, β] from its prefix token into every token (linear attention, score 1)."""
        key = ("norm_params", block, version)
        if key not in self.memo:
            d = self.layout.blocks[block].d_out
            one = torch.ones(1, 1, dtype=self.dtype)
            layer = self.layer(("copy_norm_params", d), lambda: P.Attention(
                one, one, _eye(2 * d, self.dtype), _eye(2 * d, self.dtype), heads=1, softmax=False, mask="full"))
            self.memo[key] = self.call(layer, [self.tok(self.inputs["one"]),
                                               self.block_read(block, version, range(2 * d, 2 * d + 1)),
                                               self.block_read(block, version, range(0, 2 * d))], 2 * d)
        gb = self.memo[key]
        return gb.part(0, gb.width // 2), gb.part(gb.width // 2, gb.width // 2)

    # -- forward ops ---------------------------------------------------------------------
    def lower_add(self, node):
        self.fields[node.name] = self._sum(self.x(node, 0), self.x(node, 1))

    def lower_layer_norm(self, node):
        block, version = self.block_of(node)
        xhat = self._normalised(self.x(node), node.attrs["eps"])
        gamma, beta = self._norm_params(block, version)
        d = xhat.width
        e = _eye(d, self.dtype)
        layer = self.layer(("affine", d), lambda: P.Gate(e, e, e))
        self.fields[node.name] = self.call(layer, [self.tok(xhat), self.tok(gamma), self.tok(beta)], d)

    def lower_linear(self, node):
        """y = W x + b: S heads of linear attention from tokens to the K prefix tokens of W.
        Head s scores ⟨[x; 1], [W[jS+s]; b[jS+s]]⟩ = y[jS+s] and routes it by j's one-hot."""
        block, version = self.block_of(node)
        b = self.layout.blocks[block]
        S, K, din, dout = b.rows, b.tokens, b.d_in, b.d_out
        dt = self.dtype

        def build():
            return P.Attention(_stack([_eye(din + 1, dt)] * S), _eye(S * (din + 1), dt),
                               _stack([_eye(K, dt)] * S), _rows_by_slot(S, K, dt).T, heads=S, softmax=False,
                               mask="full")

        layer = self.layer(("linear_forward", din, dout, K), build)
        self.fields[node.name] = self.call(layer, [
            self.tok(self.x(node), self.inputs["one"]),
            self.block_read(block, version, range(0, S * (din + 1))),
            self.block_read(block, version, b.onehot)], dout)

    def lower_activation(self, node):
        x = self.x(node)
        e = _eye(x.width, self.dtype)
        layer = self.layer(("activation", node.attrs["fn"], x.width), lambda: P.MLP(e, e, node.attrs["fn"]))
        self.fields[node.name] = self.call(layer, [self.tok(x)], x.width)

    def lower_attention(self, node):
        a = node.attrs
        q, k, v = (self.x(node, i) for i in range(3))
        d = q.width
        e = _eye(d, self.dtype)
        layer = self.layer(("attention", d, a["heads"], repr(a["scale"])),
                           lambda: P.Attention(a["scale"] * e, e, e, e, a["heads"], softmax=True, mask="causal"))
        self.fields[node.name] = self.call(layer, [self.tok(q), self.tok(k), self.tok(v)], d)

    def lower_lm_head(self, node):
        self.logits = self.x(node)  # the TinT's output head reads it with the unembedding

    def lower_output(self, node):
        pass

    # -- the loss gradient ---------------------------------------------------------------
    def _next_token(self) -> Field:
        """[E_{z_{t+1}}, m_{t+1}, l_{t+1}] at every t: linear attention whose query is the
        one-hot of t+1 (a shift of t's one-hot) and whose keys are the one-hots."""
        if "next" not in self.memo:
            n, d = self.tmax, self.graph.attrs["d_model"]
            shift = torch.zeros(n, n, dtype=self.dtype)
            shift[torch.arange(1, n), torch.arange(0, n - 1)] = 1.0  # e_t -> e_{t+1}
            layer = self.layer(("next_token", n, d), lambda: P.Attention(
                shift, _eye(n, self.dtype), _eye(d + 2, self.dtype), _eye(d + 2, self.dtype),
                heads=1, softmax=False, mask="full"))
            target = self.inputs.get("target_embed", self.inputs["token_embed"])
            pos = self.inputs["positions"]
            self.memo["next"] = self.call(layer, [self.tok(pos), self.tok(pos),
                                                  self.tok(target, self.inputs["train"], self.inputs["label"])], d + 2)
        return self.memo["next"]

    def lower_loss_grad(self, node):
        """w_t·(Σ_v softmax_v(⟨E_v, x_t⟩)·E_v − E_{z_{t+1}}), w_t = m_t·m_{t+1}·l_{t+1}: the first term is
        one softmax head whose keys and values are the vocabulary rows."""
        x, train, label = self.x(node, 0), self.x(node, 2), self.x(node, 3)
        d = x.width
        nxt = self._next_token()
        pair = self._product(train, nxt.part(d, 1))
        weight = self._product(pair, nxt.part(d + 1, 1))
        e = _eye(d, self.dtype)
        layer = self.layer(("expected_embedding", d), lambda: P.Attention(e, e, e, e, heads=1, softmax=True,
                                                                          mask="full"))
        expected = self.call(layer, [self.tok(x), Read("unembed"), Read("unembed")], d)
        self.fields[node.name] = self._product(weight, self._difference(expected, nxt.part(0, d)))

    # -- backward ops --------------------------------------------------------------------
    def lower_linear_backward(self, node):
        """∂x = Σ_r ∂y[r]·W[r]: head s scores ∂y[jS+s] against j's one-hot and sums the rows."""
        block, version = self.block_of(node)
        b = self.layout.blocks[block]
        S, K, din, dout = b.rows, b.tokens, b.d_in, b.d_out
        dt = self.dtype

        def build():
            w_v = torch.zeros(S * din, S * (din + 1), dtype=dt)
            for s in range(S):
                w_v[s * din : (s + 1) * din, s * (din + 1) : s * (din + 1) + din] = _eye(din, dt)
            return P.Attention(_rows_by_slot(S, K, dt), _stack([_eye(K, dt)] * S), w_v,
                               _stack([_eye(din, dt)] * S, 1), heads=S, softmax=False, mask="full")

        layer = self.layer(("linear_backward", din, dout, K), build)
        self.fields[node.name] = self.call(layer, [
            self.tok(self.x(node)), self.block_read(block, version, b.onehot),
            self.block_read(block, version, range(0, S * (din + 1)))], din)

    def lower_layer_norm_backward(self, node):
        """Finite difference: N·[f(x + (γ⊙∂y)·(1/N)) − f(x)], step by step as the rule computes it."""
        a = node.attrs
        if a["rule"] != "finite_difference":
            raise BackendError(f"node %{node.name}: layer-norm backward rule {a['rule']!r} has no TinT "
                               "construction; allowed: finite_difference")
        block, version = self.block_of(node)
        x, dy = self.x(node, 0), self.x(node, 1)
        gamma, _ = self._norm_params(block, version)
        shifted = self._sum(x, self._scaled(self._product(gamma, dy), 1.0 / a["scale"]))
        change = self._difference(self._normalised(shifted, a["eps"]), self._normalised(x, a["eps"]))
        self.fields[node.name] = self._scaled(change, a["scale"])

    def lower_activation_backward(self, node):
        """Finite difference: N·[σ(x + ∂y·(1/N)) − σ(x)]: one MLP with hidden [x + ∂y/N; x]."""
        a = node.attrs
        if a["rule"] != "finite_difference":
            raise BackendError(f"node %{node.name}: activation backward rule {a['rule']!r} has no TinT "
                               "construction; allowed: finite_difference")
        x, dy = self.x(node, 0), self.x(node, 1)
        f = x.width
        e, z = _eye(f, self.dtype), torch.zeros(f, f, dtype=self.dtype)
        layer = self.layer(("activation_difference", a["fn"], f), lambda: P.MLP(
            torch.cat([torch.cat([e, e], 1), torch.cat([e, z], 1)], 0), torch.cat([e, -e], 1), a["fn"]))
        change = self.call(layer, [self.tok(x, self._scaled(dy, 1.0 / a["scale"]))], f)
        self.fields[node.name] = self._scaled(change, a["scale"])

    def lower_attention_backward(self, node):
        """Stop-gradient rule, ∂v_j = Σ_t a_tj ∂o_t, in two exact heads per aux head: a softmax head
        whose values are one-hot positions writes the row a_t; a linear head with query e_j and
        key a_t then weighs ∂o_t by a_tj."""
        a = node.attrs
        q, k, do = (self.x(node, i) for i in range(3))
        d, h, n, dt = q.width, a["heads"], self.tmax, self.dtype
        e, en, ehn = _eye(d, dt), _eye(n, dt), _eye(h * n, dt)
        probs_layer = self.layer(("attention_rows", d, h, n, repr(a["scale"])), lambda: P.Attention(
            a["scale"] * e, e, _stack([en] * h), ehn, heads=h, softmax=True, mask="causal"))
        rows = self.call(probs_layer, [self.tok(q), self.tok(k), self.tok(self.inputs["positions"])], h * n)
        back_layer = self.layer(("attention_backward", d, h, n), lambda: P.Attention(
            _stack([en] * h), ehn, e, e, heads=h, softmax=False, mask="full"))
        self.fields[node.name] = self.call(back_layer, [self.tok(self.inputs["positions"]), self.tok(rows),
                                                        self.tok(do)], d)

    # -- descent ops: a block's next version -------------------------------------------
    def _next_version(self, block: str, version: int) -> tuple[str, int]:
        if self.block_version[block] != version:
            raise BackendError(f"node %{self.node.name}: block {block} is at version {self.block_version[block]}, "
                               f"the descent expects {version}")
        self.block_version[block] = version + 1
        return f"{block}@{version}", version + 1

    def lower_linear_descent(self, node):
        """W[r] −= η Σ_t ∂y_t[r]·x_t, b[r] −= η Σ_t ∂y_t[r]: the K prefix tokens query the tokens;
        head s scores ∂y_t[jS+s] and its value −η·[x_t; 1] is added to row slot s."""
        block, version = self.block_of(node)
        b = self.layout.blocks[block]
        S, K, din, dout = b.rows, b.tokens, b.d_in, b.d_out
        lr, has_w, has_b = node.attrs["lr"], "weight" in node.weights, "bias" in node.weights
        dt = self.dtype

        def build():
            keep = torch.tensor([1.0 if has_w else 0.0] * din + [1.0 if has_b else 0.0], dtype=dt)
            return P.Attention(_stack([_eye(K, dt)] * S), _rows_by_slot(S, K, dt),
                               _stack([-lr * torch.diag(keep)] * S), _eye(S * (din + 1), dt),
                               heads=S, softmax=False, mask="full")

        layer = self.layer(("linear_descent", din, dout, K, repr(lr), has_w, has_b), build)
        base, new = self._next_version(block, version)
        self.call(layer, [self.block_read(block, version, b.onehot), self.tok(self.x(node, 1)),
                          self.tok(self.x(node, 0), self.inputs["one"])],
                  write=self.block_read(block, new, range(0, S * (din + 1))), base=base)

    def lower_layer_norm_descent(self, node):
        """γ −= η Σ_t ∂y_t⊙x̂_t, β −= η Σ_t ∂y_t: the norm's prefix token attends to every token
        with score 1 and adds −η times their values."""
        a = node.attrs
        block, version = self.block_of(node)
        x, dy = self.x(node, 0), self.x(node, 1)
        d, dt = x.width, self.dtype
        slots = [s for s in ("gain", "bias") if s in node.weights]
        values = [self._product(dy, self._normalised(x, a["eps"])) if s == "gain" else dy for s in slots]
        one = torch.ones(1, 1, dtype=dt)

        def build():
            w_o = torch.zeros(2 * d, len(slots) * d, dtype=dt)
            for i, s in enumerate(slots):
                at = 0 if s == "gain" else d
                w_o[at : at + d, i * d : (i + 1) * d] = _eye(d, dt)
            return P.Attention(one, one, -a["lr"] * _eye(len(slots) * d, dt), w_o, heads=1, softmax=False,
                               mask="full")

        layer = self.layer(("norm_descent", d, repr(a["lr"]), *slots), build)
        base, new = self._next_version(block, version)
        self.call(layer, [self.block_read(block, version, range(2 * d, 2 * d + 1)), self.tok(self.inputs["one"]),
                          self.tok(*values)], write=self.block_read(block, new, range(0, 2 * d)), base=base)


def _rows_by_slot(S: int, K: int, dtype) -> torch.Tensor:
    """[S·K, S·K] selection: head s, position j <- coordinate jS+s (of a ∂y of width S·K)."""
    m = torch.zeros(S * K, S * K, dtype=dtype)
    for s in range(S):
        for j in range(K):
            m[s * K + j, j * S + s] = 1.0
    return m
