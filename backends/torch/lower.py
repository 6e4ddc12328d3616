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
from tintc.errors import BackendError

from . import runtime as P
from .low_rank import factorise
from .prefixes import Layout
from .program import TOKENS, Call, Field, Program, Read, Write

EXACT_DERIVATIVES = {"gelu_tanh": "_gelu_tanh_derivative", "relu": "_relu_derivative"}  # exact σ'⊙∂y
PROBE_SCALE = {torch.float64: 2.0 ** -17, torch.float32: 2.0 ** -10}  # _divided_by_sigma's s, per dtype

OP_OF_KIND = {"add": "residual", "layer_norm": "norm", "linear": "linear", "activation": "activation",
              "attention": "attention", "attention_score": "attention", "loss_grad": "loss"}


def lower(graph: Graph, layout: Layout, max_length: int, dtype=torch.float32) -> Program:
    return _Lowering(graph, layout, max_length, dtype).run()


class _Lowering:
    def __init__(self, graph: Graph, layout: Layout, max_length: int, dtype):
        self.graph, self.layout, self.tmax, self.dtype = graph, layout, max_length, dtype
        self.share = graph.attrs.get("share_blocks", True)
        self.rank = graph.attrs.get("low_rank")
        self.low_rank_log: list[dict] = []
        self.steps = graph.attrs["steps"]
        self.width = 0
        self.values: list[Field] = []  # every field allocated, in order
        self.calls: list[Call] = []
        self.layers: dict[str, nn.Module] = {}
        self.fields: dict[str, Field] = {}  # training-graph value -> its field
        self.memo: dict[tuple, Field] = {}  # derived values computed once (x̂, copied γ/β, shifts)
        self.block_version: dict[str, int] = {b: 0 for b in layout.blocks}
        d = graph.attrs["d_model"]
        self.inputs = {"one": self.alloc(1), "zero": self.alloc(1), "positions": self.alloc(max_length),
                       "train": self.alloc(1), "label": self.alloc(1), "token_embed": self.alloc(d),
                       "pos_embed": self.alloc(d)}
        if not layout.tied:
            self.inputs["target_embed"] = self.alloc(d)  # unembed[z]: the loss's target rows
        self.node: Node | None = None
        self.logits: Field | None = None

    # -- bookkeeping ---------------------------------------------------------------------
    def alloc(self, width: int) -> Field:
        f = Field(self.width, width)
        self.width += width
        self.values.append(f)
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
            if self.rank is not None:
                self.low_rank_log += factorise(name, self.layers[name], self.rank)
        return name

    def call(self, layer: str, reads: list, out: list[Field] | Write) -> None:
        """reads: per primitive input, a Read or a list of per-group field tuples (token stream)."""
        reads = tuple(r if isinstance(r, Read) else Read(TOKENS, tuple(tuple(g) for g in r)) for r in reads)
        write = out if isinstance(out, Write) else Write(TOKENS, tuple(out))
        node = self.node
        self.calls.append(Call(layer, reads, write, node.name, self._op(node), self._phase(node)))

    def new(self, width: int, group: int) -> tuple[Field, list[Field]]:
        """A fresh field and its chunks of `group` width (the groups' output fields)."""
        f = self.alloc(width)
        return f, f.chunks(group)

    def group(self, width: int) -> int:
        """The chunk width for elementwise work on a value of `width`: the op's `group_width`
        (passes/sub_mlp.py) where it divides, else one chunk."""
        g = self.node.attrs.get("group_width", width)
        return g if width % g == 0 else width

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

    def block_of(self, node: Node) -> tuple[str, int]:
        """The prefix block holding a node's weights, and the version to read (the newest it reads)."""
        blocks = {self.layout.by_ref[ref.key][0] for ref in node.weights.values()}
        if len(blocks) != 1:
            raise BackendError(f"node %{node.name}: reads weights of {len(blocks)} prefix blocks; expected one")
        return blocks.pop(), max(ref.version for ref in node.weights.values())

    @staticmethod
    def block_read(block: str, version: int, groups: list[range]) -> Read:
        return Read(f"{block}@{version}", tuple((Field(r.start, len(r)),) for r in groups))

    # -- the driver ----------------------------------------------------------------------
    def run(self) -> Program:
        for node in self.graph.nodes():
            self.node = node
            method = getattr(self, "lower_" + node.kind, None)
            if method is None:
                raise BackendError(f"node %{node.name}: op kind {node.kind!r} has no TinT construction")
            method(node)
        final = {b: f"{b}@{v}" for b, v in self.block_version.items()}
        return Program(self.width, self.tmax, self.inputs, self.calls, self.layers, self.logits, final, self.layout,
                       self.values, self.low_rank_log, self.rank is not None)

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

    # -- elementwise constructions, in chunks of the group width -----------------------
    def _chunked_linear(self, name: str, weight: Callable[[int], torch.Tensor], *values: Field) -> Field:
        """out = W·[a; b; …] chunk by chunk: W is built for one chunk (width g per value)."""
        g = self.group(values[0].width)
        layer = self.layer((name, g), lambda: P.Linear(weight(g)))
        out, chunks = self.new(values[0].width, g)
        self.call(layer, [list(zip(*(v.chunks(g) for v in values)))], chunks)
        return out

    def _sum(self, a: Field, b: Field) -> Field:
        return self._chunked_linear("sum", lambda g: torch.cat([self.eye(g)] * 2, 1), a, b)

    def _difference(self, a: Field, b: Field) -> Field:
        return self._chunked_linear("difference", lambda g: torch.cat([self.eye(g), -self.eye(g)], 1), a, b)

    def _scaled(self, a: Field, factor: float) -> Field:
        return self._chunked_linear(f"scale_{factor!r}", lambda g: factor * self.eye(g), a)

    def _product(self, a: Field, b: Field) -> Field:
        """a ⊙ b chunk by chunk; a of width 1 is broadcast over b."""
        g = self.group(b.width)
        left = (lambda: torch.ones(g, 1, dtype=self.dtype)) if a.width == 1 else (lambda: self.eye(g))
        layer = self.layer(("product", a.width == 1, g), lambda: P.Gate(left(), self.eye(g)))
        a_chunks = [a] * (b.width // g) if a.width == 1 else a.chunks(g)
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

    def _norm_params(self, block: str, version: int) -> tuple[Field, Field]:
        """Copy a layer norm's [γ, β] from its prefix token into every token: linear attention
        with score 1, one head per chunk."""
        key = ("norm_params", block, version)
        if key not in self.memo:
            d = self.layout.blocks[block].d_out
            g = self.group(d)
            one = torch.ones(1, 1, dtype=self.dtype)
            layer = self.layer(("copy_norm_params", g), lambda: P.Attention(
                one, one, self.eye(g), self.eye(g), softmax=False, mask="full"))
            out, chunks = self.new(2 * d, g)
            heads = len(chunks)
            self.call(layer, [[(self.inputs["one"],)] * heads,
                              self.block_read(block, version, [range(2 * d, 2 * d + 1)] * heads),
                              self.block_read(block, version, [range(i, i + g) for i in range(0, 2 * d, g)])],
                      chunks)
            self.memo[key] = out
        gb = self.memo[key]
        return gb.part(0, gb.width // 2), gb.part(gb.width // 2, gb.width // 2)

    # -- forward ops ---------------------------------------------------------------------
    def lower_add(self, node):
        self.fields[node.name] = self._sum(self.x(node, 0), self.x(node, 1))

    def lower_layer_norm(self, node):
        block, version = self.block_of(node)
        xhat = self._normalised(self.x(node), node.attrs["eps"])
        gamma, beta = self._norm_params(block, version)
        g = self.group(xhat.width)
        layer = self.layer(("affine", g), lambda: P.Gate(self.eye(g), self.eye(g), self.eye(g)))
        out, chunks = self.new(xhat.width, g)
        self.call(layer, [[(c,) for c in f.chunks(g)] for f in (xhat, gamma, beta)], chunks)
        self.fields[node.name] = out

    def _one_or_zero(self, chunk: int) -> Field:
        """The bias input of row chunk `chunk`: 1 for the first chunk, 0 for the others."""
        return self.inputs["one"] if chunk == 0 else self.inputs["zero"]

    def lower_linear(self, node):
        """y = W x + b: head (s, ch) scores ⟨[x_ch; 1 or 0], [W[sK+j]_ch; b or 0]⟩ against each prefix
        token j and routes it by j's one-hot to y[sK+j]; the chunks' heads add up."""
        block, version = self.block_of(node)
        b = self.layout.blocks[block]
        S, K, C, c = b.rows, b.tokens, b.chunks, b.chunk
        x = self.x(node)
        layer = self.layer(("linear_forward", c, K), lambda: P.Attention(
            self.eye(c + 1), self.eye(c + 1), self.eye(K), self.eye(K), softmax=False, mask="full"))
        heads = [(s, ch) for s in range(S) for ch in range(C)]
        out = self.alloc(b.d_out)
        self.call(layer, [
            [(x.part(ch * c, c), self._one_or_zero(ch)) for s, ch in heads],
            self.block_read(block, version, [b.unit(s, ch) for s, ch in heads]),
            self.block_read(block, version, [b.onehot] * len(heads))],
            [out.part(s * K, K) for s, ch in heads])
        self.fields[node.name] = out

    def lower_activation(self, node):
        x, fn = self.x(node), node.attrs["fn"]
        g = self.group(x.width)
        layer = self.layer(("activation", fn, g), lambda: P.MLP(self.eye(g), self.eye(g), fn))
        out, chunks = self.new(x.width, g)
        self.call(layer, [[(c,) for c in x.chunks(g)]], chunks)
        self.fields[node.name] = out

    def lower_attention(self, node):
        a = node.attrs
        hd = a["head_dim"]
        q, k, v = (self.x(node, i).chunks(hd) for i in range(3))
        layer = self.layer(("attention", hd, repr(a["scale"])), lambda: P.Attention(
            a["scale"] * self.eye(hd), self.eye(hd), self.eye(hd), self.eye(hd), softmax=True, mask="causal"))
        out, chunks = self.new(self.x(node).width, hd)
        self.call(layer, [[(c,) for c in q], [(c,) for c in k], [(c,) for c in v]], chunks)
        self.fields[node.name] = out

    def lower_lm_head(self, node):
        self.logits = self.x(node)  # the TinT's output head reads it with the unembedding

    def lower_output(self, node):
        pass

    # -- the loss gradient ---------------------------------------------------------------
    def _next_token(self) -> tuple[Field, Field]:
        """E_{z_{t+1}} and [m_{t+1}, l_{t+1}] at every t: linear attention whose query is the
        one-hot of t+1 (a shift of t's one-hot) and whose keys are the one-hots."""
        if "next" not in self.memo:
            n = self.tmax
            shift = torch.zeros(n, n, dtype=self.dtype)
            shift[torch.arange(1, n), torch.arange(0, n - 1)] = 1.0  # e_t -> e_{t+1}
            pos = self.inputs["positions"]

            def shifted(groups: list[tuple[Field, ...]], width: int) -> Field:
                layer = self.layer(("next_token", n, width), lambda: P.Attention(
                    shift, self.eye(n), self.eye(width), self.eye(width), softmax=False, mask="full"))
                out, outs = self.new(width * len(groups), width)
                self.call(layer, [[(pos,)] * len(groups), [(pos,)] * len(groups), groups], outs)
                return out

            target = self.inputs.get("target_embed", self.inputs["token_embed"])
            g = self.group(target.width)
            self.memo["next"] = (shifted([(c,) for c in target.chunks(g)], g),
                                 shifted([(self.inputs["train"], self.inputs["label"])], 2))
        return self.memo["next"]

    def lower_loss_grad(self, node):
        """w_t·(Σ_v softmax_v(⟨E_v, x_t⟩)·E_v − E_{z_{t+1}}), w_t = m_t·m_{t+1}·l_{t+1}: the first term is
        one softmax head whose keys and values are the vocabulary rows."""
        x, train = self.x(node, 0), self.x(node, 2)
        d = x.width
        next_embed, next_masks = self._next_token()
        weight = self._product(self._product(train, next_masks.part(0, 1)), next_masks.part(1, 1))
        layer = self.layer(("expected_embedding", d), lambda: P.Attention(
            self.eye(d), self.eye(d), self.eye(d), self.eye(d), softmax=True, mask="full"))
        expected = self.alloc(d)
        self.call(layer, [[(x,)], Read("unembed"), Read("unembed")], [expected])
        self.fields[node.name] = self._product(weight, self._difference(expected, next_embed))

    # -- backward ops --------------------------------------------------------------------
    def lower_linear_backward(self, node):
        """∂x = Σ_r ∂y[r]·W[r]: head (s, ch) scores ∂y[sK+j] against j's one-hot and sums
        chunk ch of the rows into ∂x[ch]."""
        block, version = self.block_of(node)
        b = self.layout.blocks[block]
        S, K, C, c = b.rows, b.tokens, b.chunks, b.chunk
        dy = self.x(node)
        layer = self.layer(("linear_backward", c, K), lambda: P.Attention(
            self.eye(K), self.eye(K), self.eye(c), self.eye(c), softmax=False, mask="full"))
        heads = [(s, ch) for s in range(S) for ch in range(C)]
        out = self.alloc(b.d_in)
        self.call(layer, [
            [(dy.part(s * K, K),) for s, ch in heads],
            self.block_read(block, version, [b.onehot] * len(heads)),
            self.block_read(block, version, [b.unit(s, ch)[:-1] for s, ch in heads])],
            [out.part(ch * c, c) for s, ch in heads])
        self.fields[node.name] = out

    def lower_layer_norm_backward(self, node):
        """finite_difference: N·[f(x + (γ⊙∂y)·(1/N)) − f(x)], step by step as the rule computes it.
        exact: ∂x = w/σ, w = u − mean(u) − x̂·mean(x̂⊙u), u = γ⊙∂y (see _divided_by_sigma)."""
        a = node.attrs
        if a["rule"] not in ("finite_difference", "exact"):
            raise BackendError(f"node %{node.name}: layer-norm backward rule {a['rule']!r} has no TinT "
                               "construction; allowed: finite_difference, exact")
        block, version = self.block_of(node)
        x, dy = self.x(node, 0), self.x(node, 1)
        gamma, _ = self._norm_params(block, version)
        u = self._product(gamma, dy)
        if a["rule"] == "exact":
            xhat = self._normalised(x, a["eps"])
            d = x.width
            mean = lambda: torch.full((1, d), 1.0 / d, dtype=self.dtype)  # noqa: E731
            means, _ = self.new(2, 1)  # [mean(u), mean(x̂⊙u)]
            layer = self.layer(("mean", d), lambda: P.Linear(mean()))
            self.call(layer, [[(u,), (self._product(xhat, u),)]], [means.part(0, 1), means.part(1, 1)])
            along = self._product(means.part(1, 1), xhat)  # mean(x̂⊙u)·x̂
            e, ones = self.eye(d), torch.ones(d, 1, dtype=self.dtype)
            w = self._linear_of("centred_gradient", torch.cat([e, -e, -ones], 1), [u, along, means.part(0, 1)])
            self.fields[node.name] = self._divided_by_sigma(x, w, a["eps"])
            return
        shifted = self._sum(x, self._scaled(u, 1.0 / a["scale"]))
        change = self._difference(self._normalised(shifted, a["eps"]), self._normalised(x, a["eps"]))
        self.fields[node.name] = self._scaled(change, a["scale"])

    def _linear_of(self, name: str, weight: torch.Tensor, values: list[Field]) -> Field:
        """One per-position linear map of the concatenated values (a single group)."""
        layer = self.layer((name, *weight.shape), lambda: P.Linear(weight))
        out = self.alloc(weight.shape[0])
        self.call(layer, [[tuple(values)]], [out])
        return out

    def _divided_by_sigma(self, x: Field, w: Field, eps: float) -> Field:
        """w/σ, σ = sqrt(var(x) + eps), by a layer norm: with y = x − mean(x) and z = [y, −y, s·w, −s·w]
        (mean 0), LN_{eps/2}(z)[2D:3D] = s·w·√2 / sqrt(var + eps + s²|w|²/D). The last term changes the
        result by a relative s²|w|²/(2D·σ²); the normaliser's mean, 0 up to rounding ε·|y|, shifts s·w
        by a relative ε·|y|/(s·|w|). s (a power of two, PROBE_SCALE) balances the two per dtype.
        Measured (every rule exact, tiny GPT-2 and OPT against exact GD; the standard view against
        the fast executor on the micro models, whose dense sums round differently): float64 2⁻¹⁷
        gives 2–4e-12 and 2.5e-10 (2⁻²⁰: 1e-11 and 1.6e-9; 2⁻¹⁵: 7e-11 and 5e-11); float32 2⁻¹⁰
        gives the float32 floor, 2.1e-5 where the oracle itself is 2.4e-5 from float64 (2⁻²⁰: 1e-3).
        The balance depends on |w|/σ and σ: a model whose layer-norm inputs are far from unit scale
        moves it (see the issue note)."""
        d = x.width
        e, z = self.eye(d), torch.zeros(d, d, dtype=self.dtype)
        s = PROBE_SCALE[self.dtype]
        centre = e - torch.full((d, d), 1.0 / d, dtype=self.dtype)
        stacked = self._linear_of("sigma_probe", torch.cat([torch.cat([centre, z], 1), torch.cat([-centre, z], 1),
                                                            torch.cat([z, s * e], 1), torch.cat([z, -s * e], 1)]),
                                  [x, w])
        normed = self._normalised(stacked, eps / 2)
        return self._scaled(normed.part(2 * d, d), 1.0 / (s * 2.0 ** 0.5))

    def lower_activation_backward(self, node):
        """finite_difference: N·[σ(x + ∂y·(1/N)) − σ(x)]: an MLP with hidden [x + ∂y/N; x] per chunk.
        exact: σ'(x)⊙∂y from units whose activation is σ' built of tanh or sigmoid (_exact_derivative)."""
        a = node.attrs
        x, dy = self.x(node, 0), self.x(node, 1)
        if a["rule"] == "exact" and a["fn"] in EXACT_DERIVATIVES:
            self.fields[node.name] = getattr(self, EXACT_DERIVATIVES[a["fn"]])(x, dy)
            return
        if a["rule"] != "finite_difference":
            raise BackendError(f"node %{node.name}: activation backward rule {a['rule']!r} for {a['fn']} has no "
                               f"TinT construction; allowed: finite_difference, or exact for "
                               f"{', '.join(EXACT_DERIVATIVES)}")
        g = self.group(x.width)
        e, z = self.eye(g), torch.zeros(g, g, dtype=self.dtype)
        layer = self.layer(("activation_difference", a["fn"], g), lambda: P.MLP(
            torch.cat([torch.cat([e, e], 1), torch.cat([e, z], 1)], 0), torch.cat([e, -e], 1), a["fn"]))
        scaled = self._scaled(dy, 1.0 / a["scale"])
        change, chunks = self.new(x.width, g)
        self.call(layer, [list(zip(x.chunks(g), scaled.chunks(g)))], chunks)
        self.fields[node.name] = self._scaled(change, a["scale"])

    def _activated(self, x: Field, fn: str, scale: float = 1.0) -> Field:
        """fn(scale·x), chunk by chunk: an MLP."""
        g = self.group(x.width)
        layer = self.layer(("activation", fn, g, repr(scale)), lambda: P.MLP(scale * self.eye(g), self.eye(g), fn))
        out, chunks = self.new(x.width, g)
        self.call(layer, [[(c,) for c in x.chunks(g)]], chunks)
        return out

    def _gelu_tanh_derivative(self, x: Field, v: Field) -> Field:
        """gelu_tanh'(x)⊙v with T = tanh(k(x + a·x³)), k = √(2/π), a = 0.044715:
        0.5·v + 0.5·T⊙v + 0.5·k·(p − T²⊙p), p = (x + 3a·x³)⊙v. Exact: products, linear maps and a
        tanh unit (a GTU)."""
        k, c = (2.0 / math.pi) ** 0.5, 0.044715
        x3 = self._product(self._product(x, x), x)
        t = self._activated(self._chunked_linear("tanh_argument", lambda g: torch.cat([k * self.eye(g),
                                                                                        k * c * self.eye(g)], 1),
                                                 x, x3), "tanh")
        p = self._chunked_linear("gelu_tanh_p", lambda g: torch.cat([self.eye(g), 3 * c * self.eye(g)], 1),
                                 self._product(x, v), self._product(x3, v))
        t2p = self._product(self._product(t, t), p)
        return self._chunked_linear("gelu_tanh_derivative", lambda g: torch.cat(
            [0.5 * self.eye(g), 0.5 * self.eye(g), 0.5 * k * self.eye(g), -0.5 * k * self.eye(g)], 1),
            v, self._product(t, v), p, t2p)

    def _relu_derivative(self, x: Field, v: Field) -> Field:
        """step(x)⊙v as sigmoid(M·x)⊙v, M = 2⁴⁰: sigmoid(M·x) is 1 or 0 to the last bit for |x| > 40/M
        (4e-11), where relu' is 1 or 0; it differs only closer to 0 (relu'(0) = 0, sigmoid(0) = ½)."""
        return self._product(self._activated(x, "sigmoid", 2.0 ** 40), v)

    def _attention_rows(self, node) -> Field:
        """Each token's attention row a_t over one-hot positions, per aux head (h·T wide): a softmax
        head whose values are the one-hot positions. Computed once per (q, k)."""
        a = node.attrs
        hd, h, n = a["head_dim"], a["heads"], self.tmax
        key = ("attention_rows", self.x(node, 0), self.x(node, 1))
        if key not in self.memo:
            q, k = (self.x(node, i).chunks(hd) for i in range(2))
            layer = self.layer(("attention_rows", hd, n, repr(a["scale"])), lambda: P.Attention(
                a["scale"] * self.eye(hd), self.eye(hd), self.eye(n), self.eye(n), softmax=True, mask="causal"))
            rows, row_chunks = self.new(h * n, n)
            self.call(layer, [[(c,) for c in q], [(c,) for c in k], [(self.inputs["positions"],)] * h], row_chunks)
            self.memo[key] = rows
        return self.memo[key]

    def lower_attention_backward(self, node):
        """∂v_j = Σ_t a_tj ∂o_t (exact under both rules), per aux head: a linear head with query e_j and
        key a_t weighs ∂o_t by a_tj."""
        a = node.attrs
        hd, h, n = a["head_dim"], a["heads"], self.tmax
        do = self.x(node, 2).chunks(hd)
        rows = self._attention_rows(node).chunks(n)
        back_layer = self.layer(("attention_backward", hd, n), lambda: P.Attention(
            self.eye(n), self.eye(n), self.eye(hd), self.eye(hd), softmax=False, mask="full"))
        out, chunks = self.new(self.x(node).width, hd)
        self.call(back_layer, [[(self.inputs["positions"],)] * h, [(c,) for c in rows], [(c,) for c in do]], chunks)
        self.fields[node.name] = out

    def _score_gradient(self, node) -> Field:
        """g_tj = a_tj·(d_tj − Σ_j' a_tj' d_tj'), d_tj = ⟨∂o_t, v_j⟩, per aux head (h·T wide), once per
        attention: a causal linear head (query ∂o_t, key v_j, value e_j) gives d_t; products, a row sum
        and a difference give g_t."""
        a = node.attrs
        hd, h, n = a["head_dim"], a["heads"], self.tmax
        q, k, v, do = (self.x(node, i) for i in range(4))
        key = ("score_gradient", q, k, v, do)
        if key not in self.memo:
            rows = self._attention_rows(node)
            d_layer = self.layer(("attention_score_products", hd, n), lambda: P.Attention(
                self.eye(hd), self.eye(hd), self.eye(n), self.eye(n), softmax=False, mask="causal"))
            d, d_chunks = self.new(h * n, n)
            self.call(d_layer, [[(c,) for c in do.chunks(hd)], [(c,) for c in v.chunks(hd)],
                                [(self.inputs["positions"],)] * h], d_chunks)
            weighted = self._product(rows, d)  # a_tj·d_tj
            sum_layer = self.layer(("row_sum", n), lambda: P.Linear(torch.ones(1, n, dtype=self.dtype)))
            sums, sum_chunks = self.new(h, 1)
            self.call(sum_layer, [[(c,) for c in weighted.chunks(n)]], sum_chunks)
            scale_layer = self.layer(("scale_row", n), lambda: P.Gate(torch.ones(n, 1, dtype=self.dtype), self.eye(n)))
            scaled, scaled_chunks = self.new(h * n, n)  # (Σ_j' a_tj' d_tj')·a_t
            self.call(scale_layer, [[(c,) for c in sum_chunks], [(c,) for c in rows.chunks(n)]], scaled_chunks)
            self.memo[key] = self._difference(weighted, scaled)
        return self.memo[key]

    def lower_attention_score_backward(self, node):
        """∂q_t = scale·Σ_j g_tj k_j: a linear head with query g_t and key e_j, value k_j; ∂k_j =
        scale·Σ_t g_tj q_t: query e_j, key g_t, value q_t."""
        a = node.attrs
        hd, h, n = a["head_dim"], a["heads"], self.tmax
        g = self._score_gradient(node).chunks(n)
        values = self.x(node, 1 if a["wrt"] == "q" else 0).chunks(hd)
        pos = [(self.inputs["positions"],)] * h
        layer = self.layer(("attention_score_backward", hd, n, repr(a["scale"])), lambda: P.Attention(
            self.eye(n), self.eye(n), a["scale"] * self.eye(hd), self.eye(hd), softmax=False, mask="full"))
        queries, keys = ([(c,) for c in g], pos) if a["wrt"] == "q" else (pos, [(c,) for c in g])
        out, chunks = self.new(self.x(node).width, hd)
        self.call(layer, [queries, keys, [(c,) for c in values]], chunks)
        self.fields[node.name] = out

    # -- descent ops: a block's next version -------------------------------------------
    def _next_version(self, block: str, version: int) -> tuple[str, int]:
        if self.block_version[block] != version:
            raise BackendError(f"node %{self.node.name}: block {block} is at version {self.block_version[block]}, "
                               f"the descent expects {version}")
        self.block_version[block] = version + 1
        return f"{block}@{version}", version + 1

    def lower_linear_descent(self, node):
        """W[r] −= η Σ_t ∂y_t[r]·x_t, b[r] −= η Σ_t ∂y_t[r]: the K prefix tokens query the tokens;
        head (s, ch) scores ∂y_t[sK+j] and adds −η·[x_t,ch; 1 or 0] to unit (s, ch)."""
        block, version = self.block_of(node)
        b = self.layout.blocks[block]
        S, K, C, c = b.rows, b.tokens, b.chunks, b.chunk
        lr, has_w, has_b = node.attrs["lr"], "weight" in node.weights, "bias" in node.weights
        x, dy = self.x(node, 0), self.x(node, 1)
        keep = torch.tensor([1.0 if has_w else 0.0] * c + [1.0 if has_b else 0.0], dtype=self.dtype)
        layer = self.layer(("linear_descent", c, K, repr(lr), has_w, has_b), lambda: P.Attention(
            self.eye(K), self.eye(K), -lr * torch.diag(keep), self.eye(c + 1), softmax=False, mask="full"))
        heads = [(s, ch) for s in range(S) for ch in range(C)]
        base, new = self._next_version(block, version)
        units = [b.unit(s, ch) for s, ch in heads]
        self.call(layer, [
            self.block_read(block, version, [b.onehot] * len(heads)),
            [(dy.part(s * K, K),) for s, ch in heads],
            [(x.part(ch * c, c), self._one_or_zero(ch)) for s, ch in heads]],
            Write(f"{block}@{new}", tuple(Field(u.start, len(u)) for u in units), base))

    def lower_layer_norm_descent(self, node):
        """γ −= η Σ_t ∂y_t⊙x̂_t, β −= η Σ_t ∂y_t: the norm's prefix token attends to every token
        with score 1 and adds −η times their values, one head per chunk."""
        a = node.attrs
        block, version = self.block_of(node)
        x, dy = self.x(node, 0), self.x(node, 1)
        d = x.width
        g = self.group(d)
        values, targets = [], []
        for slot, at in (("gain", 0), ("bias", d)):
            if slot in node.weights:
                value = self._product(dy, self._normalised(x, a["eps"])) if slot == "gain" else dy
                values += value.chunks(g)
                targets += [Field(at + i, g) for i in range(0, d, g)]
        one = torch.ones(1, 1, dtype=self.dtype)
        layer = self.layer(("norm_descent", g, repr(a["lr"])), lambda: P.Attention(
            one, one, -a["lr"] * self.eye(g), self.eye(g), softmax=False, mask="full"))
        base, new = self._next_version(block, version)
        heads = len(values)
        self.call(layer, [self.block_read(block, version, [range(2 * d, 2 * d + 1)] * heads),
                          [(self.inputs["one"],)] * heads, [(v,) for v in values]],
                  Write(f"{block}@{new}", tuple(targets), base))
