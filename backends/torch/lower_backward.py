"""Lowering of the backward ops of the training graph (a part of backends/torch/lower.py's
_Lowering, which supplies the bookkeeping and the elementwise constructions it uses).

Linear backward is linear attention from the tokens to a prefix block. The layer-norm and
activation backward follow the rule on the op: the paper's finite differences, or exact
constructions; attention's backward gives ∂v under both rules, and the exact rule adds the
gradient through the scores for q and k. Every construction is built from the runtime's
primitives with weights from shapes and settings only.
"""

from __future__ import annotations

import math

import torch

from ir.errors import BackendError

from . import runtime as P
from .program import Field, Read

EXACT_DERIVATIVES = {"gelu_tanh": "_gelu_tanh_derivative", "gelu": "_gelu_derivative", "relu": "_relu_derivative",
                     "silu": "_silu_derivative", "gelu_bloom": "_gelu_bloom_derivative"}  # exact σ'⊙∂y
BLOOM_GELU_K = 0.79788456  # BLOOM's √(2/π) (ir/activations.py: gelu_bloom)
GELU_STEP = {torch.float64: 2.0 ** -10, torch.float32: 2.0 ** -4}  # _gelu_derivative's h, per dtype


class BackwardLowering:
    def lower_linear_backward(self, node):
        block, version = self.block_of(node)
        self.fields[node.name] = self._linear_backward(block, version, self.x(node))

    def _linear_backward(self, block: str, version: int, dy: Field) -> Field:
        """∂x = Σ_r ∂y[r]·W[r]: head (s, ch) scores ∂y[sK+j] against j's one-hot and sums
        chunk ch of the rows into ∂x[ch]."""
        b = self.layout.blocks[block]
        S, K, C, c = b.rows, b.tokens, b.chunks, b.chunk
        layer = self.layer(("linear_backward", c, K), lambda: P.Attention(
            self.eye(K), self.eye(K), self.eye(c), self.eye(c), softmax=False, mask="full", positional="keys"))
        heads = [(s, ch) for s in range(S) for ch in range(C)]
        out = self.alloc(b.d_in)
        self.call(layer, [
            [(dy.part(s * K, K),) for s, ch in heads],
            self.block_read(block, version, [b.onehot] * len(heads)),
            self.block_read(block, version, [b.unit(s, ch)[:-1] for s, ch in heads])],
            [out.part(ch * c, c) for s, ch in heads])
        return out

    def lower_layer_norm_backward(self, node):
        """finite_difference: N·[f(x + (γ⊙∂y)·(1/N)) − f(x)], step by step as the rule computes it.
        exact: ∂x = w/σ, w = u − mean(u) − x̂·mean(x̂⊙u), u = γ⊙∂y: the three means in one linear map, the
        subtractions by _minus_times, 1/σ from _divided_by_sigma with y = x − mean(x)."""
        a = node.attrs
        x, u = self._norm_backward_inputs(node, "layer-norm")
        if a["rule"] == "exact":
            xhat = self._normalised(x, a["eps"])
            one = self.inputs["one"]
            mean_x, mean_u, mean_xu = self._means(x, u, self._product(xhat, u))
            w = self._minus_times(mean_u, one, self._minus_times(mean_xu, xhat, u))
            self.fields[node.name] = self._divided_by_sigma(self._minus_times(mean_x, one, x), w, a["eps"])
            return
        self._finite_difference_backward(node, x, u, self._normalised)

    def _norm_backward_inputs(self, node, what: str) -> tuple[Field, Field]:
        """x and u = γ⊙∂y of a norm's backward (γ = offset + w with a gain offset), once its rule is known to
        have a construction."""
        if node.attrs["rule"] not in ("finite_difference", "exact"):
            raise BackendError(f"node %{node.name}: {what} backward rule {node.attrs['rule']!r} has no TinT "
                               "construction; allowed: finite_difference, exact")
        return self.x(node, 0), self._gained(node, self.x(node, 1))

    def _finite_difference_backward(self, node, x: Field, u: Field, normalise) -> None:
        """The paper's rule: N·[f(x + u·(1/N)) − f(x)], step by step as the rule computes it."""
        eps, scale = node.attrs["eps"], node.attrs["scale"]
        shifted = self._sum(x, self._scaled(u, 1.0 / scale))
        change = self._difference(normalise(shifted, eps), normalise(x, eps))
        self.fields[node.name] = self._scaled(change, scale)

    def _linear_of(self, name: str, weight: torch.Tensor, values: list[Field]) -> Field:
        """One per-position linear map of the concatenated values (a single group)."""
        layer = self.layer((name, *weight.shape), lambda: P.Linear(weight))
        out = self.alloc(weight.shape[0])
        self.call(layer, [[tuple(values)]], [out])
        return out

    def _divided_by_sigma(self, y: Field, w: Field, eps: float, heads: int = 1) -> Field:
        """w/σ, σ = sqrt(mean(y²) + eps) (layer norm: y = x − mean(x); RMSNorm: y = x), exactly: with the
        constant k = sqrt(D·eps/2) from the one, z = [y, −y, k, −k] has mean 0 and variance
        (|y|² + k²)/(D + 1); a layer norm with eps' = D·eps/(2(D + 1)) divides z by sqrt(D·σ²/(D + 1)), so
        its coordinate 2D is k·sqrt((D + 1)/D)/σ: σ's eps enters as a coordinate and the norm's own eps,
        not as an approximation (eps' > 0 keeps a position whose stream is 0, e.g. a prefix token of the
        standard view, finite). A product with w, scaled back by 1/(k·sqrt((D + 1)/D)), gives w/σ; the
        error is rounding only, and every projection is a copy (O(D) per token). heads: each of y's equal
        parts divided by its own σ (a norm of each head), one group per head."""
        if eps <= 0:
            raise BackendError(f"node %{self.node.name}: norm eps {eps!r}: the exact backward reads 1/σ off a "
                               "constant coordinate sqrt(D·eps/2); allowed: eps > 0, or the rule finite_difference")
        d = y.width // heads
        k, norm_eps = math.sqrt(d * eps / 2), d * eps / (2 * (d + 1))
        zeros, column = torch.zeros(d, 1, dtype=self.dtype), torch.ones(1, 1, dtype=self.dtype)
        stack = torch.cat([torch.cat([self.eye(d), zeros], 1), torch.cat([-self.eye(d), zeros], 1),
                           torch.cat([zeros.T, k * column], 1), torch.cat([zeros.T, -k * column], 1)])
        stack_layer = self.layer((f"sigma_stack_{k!r}", *stack.shape), lambda: P.Linear(stack))
        z, z_heads = self.new((2 * d + 2) * heads, 2 * d + 2)
        self.call(stack_layer, [[(part, self.inputs["one"]) for part in y.chunks(d)]], z_heads)
        normed, normed_heads = self.new(z.width, 2 * d + 2)
        self.call(self.layer(("norm", repr(norm_eps)), lambda: P.Norm(norm_eps)), [[(c,) for c in z_heads]],
                  normed_heads)
        factor = 1.0 / (k * math.sqrt((d + 1) / d))
        if heads == 1:
            return self._product(normed.part(2 * d, 1), w, factor=factor)
        layer = self.layer(("product", True, d, repr(factor)), lambda: P.Gate(
            factor * torch.ones(d, 1, dtype=self.dtype), self.eye(d)))
        out, chunks = self.new(w.width, d)
        self.call(layer, [[(c.part(2 * d, 1),) for c in normed_heads], [(c,) for c in w.chunks(d)]], chunks)
        return out

    def _minus_times(self, s: Field, v: Field, base: Field) -> Field:
        """base − s·v, s one number per token, v as wide as base or the one (then base − s): a gated unit
        (−s)⊙v + base whose projections are copies, O(D) per token where a linear map [I, −I, …] is dense.
        s of H numbers: base's (and v's) H equal parts, each with its own s (a norm of each head)."""
        heads, wide = s.width, v.width == base.width
        d = base.width // heads
        column = torch.ones(d, 1, dtype=self.dtype)
        layer = self.layer(("minus_times", d, wide), lambda: P.Gate(-column, self.eye(d) if wide else column,
                                                                    self.eye(d)))
        out, chunks = self.new(base.width, d)
        self.call(layer, [[(c,) for c in s.chunks(1)], [(c,) for c in v.chunks(d)] if wide else [(v,)] * heads,
                          [(c,) for c in base.chunks(d)]], chunks)
        return out

    def _means(self, *values: Field, heads: int = 1) -> list[Field]:
        """mean(v) of each value (one number per token; heads: one per equal part): one linear map, a group
        per value (and part)."""
        d = values[0].width // heads
        layer = self.layer(("mean", d), lambda: P.Linear(torch.full((1, d), 1.0 / d, dtype=self.dtype)))
        means, _ = self.new(len(values) * heads, 1)
        self.call(layer, [[(c,) for v in values for c in v.chunks(d)]], means.chunks(1))
        return [means.part(i * heads, heads) for i in range(len(values))]

    def lower_activation_backward(self, node):
        """finite_difference: N·[σ(x + ∂y·(1/N)) − σ(x)]: an MLP with hidden [x + ∂y·(1/N); x] per chunk
        and output N·σ(·) − N·σ(·), both scales inside its two maps.
        exact: σ'(x)⊙∂y from units whose activation is σ' built of tanh or sigmoid, or for erf GELU
        from GELU units (EXACT_DERIVATIVES)."""
        a = node.attrs
        x, dy = self.x(node, 0), self.x(node, 1)
        if a["rule"] == "exact" and a["fn"] in EXACT_DERIVATIVES:
            self.fields[node.name] = getattr(self, EXACT_DERIVATIVES[a["fn"]])(x, dy)
            return
        if a["rule"] != "finite_difference":
            raise BackendError(f"node %{node.name}: activation backward rule {a['rule']!r} for {a['fn']} has no "
                               f"TinT construction; allowed: finite_difference, or exact for "
                               f"{', '.join(EXACT_DERIVATIVES)}")
        g, n = self.group(x.width), a["scale"]
        e, z = self.eye(g), torch.zeros(g, g, dtype=self.dtype)
        layer = self.layer(("activation_difference", a["fn"], g, repr(n)), lambda: P.MLP(
            torch.cat([torch.cat([e, (1.0 / n) * e], 1), torch.cat([e, z], 1)], 0), torch.cat([n * e, -n * e], 1),
            a["fn"]))
        change, chunks = self.new(x.width, g)
        self.call(layer, [list(zip(x.chunks(g), dy.chunks(g)))], chunks)
        self.fields[node.name] = change

    def _gate_of(self, name: str, weights, a: tuple[Field, ...], b: tuple[Field, ...], c: tuple[Field, ...] = ()):
        """(A·a) ⊙ (B·b) + C·c chunk by chunk, one gated unit: `weights(g)` gives A, B, C (C None without c)
        for one chunk of width g of each value; a value of width 1 (the one) is read whole by every chunk."""
        width = max(v.width for v in a + b + c)
        g = self.group(width)
        layer = self.layer((name, g), lambda: P.Gate(*weights(g)))

        def chunks(values):
            return list(zip(*([v] * (width // g) if v.width == 1 else v.chunks(g) for v in values)))
        out, outs = self.new(width, g)
        self.call(layer, [chunks(a), chunks(b)] + ([chunks(c)] if c else []), outs)
        return out

    def _column(self, g: int) -> torch.Tensor:
        """The projection that reads the one into each of g coordinates."""
        return torch.ones(g, 1, dtype=self.dtype)

    def _gelu_bloom_derivative(self, x: Field, v: Field) -> Field:
        """BLOOM's GELU is gelu_tanh with k = 0.79788456: the same construction with that k."""
        return self._gelu_tanh_derivative(x, v, BLOOM_GELU_K)

    def _gelu_tanh_derivative(self, x: Field, v: Field, k: float | None = None) -> Field:
        """gelu_tanh'(x)⊙v = s + k·r⊙s, s = ½(1 + T)⊙v, r = (1 − T)⊙p, with p = x + 3a·x³ (the tanh
        argument's derivative over k), T = tanh(k(x + a·x³)) = tanh(k(2x + p)/3), k = √(2/π), a = 0.044715.
        Exact: five gated units and one tanh unit (the rounding of products, no difference step). Another
        k (BLOOM's) names its layers."""
        tag = "" if k is None else f"_{k!r}"
        k, c = k or (2.0 / math.pi) ** 0.5, 0.044715
        eye, one, ones = self.eye, self.inputs["one"], self._column
        x2 = self._product(x, x)
        p = self._gate_of("cubic_slope", lambda g: (3 * c * eye(g), eye(g), eye(g)), (x,), (x2,), (x,))
        g = self.group(x.width)
        tanh = self.layer(("gelu_tanh_T" + tag, g), lambda: P.MLP(torch.cat([2 * k / 3 * eye(g), k / 3 * eye(g)], 1),
                                                                  eye(g), "tanh"))
        t, t_chunks = self.new(x.width, g)
        self.call(tanh, [list(zip(x.chunks(g), p.chunks(g)))], t_chunks)
        s = self._gate_of("half_one_plus", lambda g: (torch.cat([0.5 * eye(g), 0.5 * ones(g)], 1), eye(g), None),
                          (t, one), (v,))
        r = self._gate_of("one_minus", lambda g: (torch.cat([-eye(g), ones(g)], 1), eye(g), None), (t, one), (p,))
        return self._gate_of("gelu_tanh_derivative" + tag, lambda g: (k * eye(g), eye(g), eye(g)), (r,), (s,), (s,))

    def _gelu_derivative(self, x: Field, v: Field) -> Field:
        """gelu'(x)⊙v for erf GELU, whose derivative Φ(x) + x·φ(x) no primitive activation gives:
        the five-point central difference [8(f(x+h) − f(x−h)) − (f(x+2h) − f(x−2h))]/(12h), an MLP of
        four GELU units per coordinate with biases ±h, ±2h from the constant one, then a product.
        Its error is h⁴·|f⁽⁵⁾|/30 (|f⁽⁵⁾| = |x⁵ − 11x³ + 18x|·φ(x) ≤ 2.9) plus rounding ≈ 1.5·ε·|x|/h:
        with h = 2⁻¹⁰ in float64 about 1e-13·max(1, |x|), with h = 2⁻⁴ in float32 about 1.4e-6·max(1, |x|)."""
        h, one = GELU_STEP[self.dtype], self.inputs["one"]
        g = self.group(x.width)

        def weights():
            e, column = self.eye(g), torch.ones(g, 1, dtype=self.dtype)
            w_in = torch.cat([torch.cat([e, shift * column], 1) for shift in (h, -h, 2 * h, -2 * h)], 0)
            return P.MLP(w_in, torch.cat([8 * e, -8 * e, -e, e], 1) / (12 * h), "gelu")
        layer = self.layer(("gelu_derivative", g, repr(h)), weights)
        derivative, chunks = self.new(x.width, g)
        self.call(layer, [[(c, one) for c in x.chunks(g)]], chunks)
        return self._product(derivative, v)

    def _silu_derivative(self, x: Field, v: Field) -> Field:
        """silu'(x)⊙v = u⊙(s⊙v), s = sigmoid(x), u = 1 + x − x⊙s: a sigmoid unit and three gated units."""
        eye, one = self.eye, self.inputs["one"]
        s = self._activated(x, "sigmoid")
        u = self._gate_of("silu_slope", lambda g: (-eye(g), eye(g), torch.cat([eye(g), self._column(g)], 1)),
                          (x,), (s,), (x, one))
        return self._product(u, self._product(s, v))

    def _relu_derivative(self, x: Field, v: Field) -> Field:
        """step(x)⊙v as sigmoid(M·x)⊙v, M = 2⁴⁰: sigmoid(M·x) is 1 or 0 to the last bit for |x| > 40/M
        (4e-11), where relu' is 1 or 0; it differs only closer to 0 (relu'(0) = 0, sigmoid(0) = ½)."""
        return self._product(self._activated(x, "sigmoid", 2.0 ** 40), v)

    def _attention_rows(self, node) -> Field:
        """Each token's attention row a_t over one-hot positions, per aux head (h·T wide): a softmax
        head whose values are the one-hot positions. Computed once per (q, k)."""
        a = node.attrs
        h, n = a["heads"], self.tmax
        key = ("attention_rows", self.x(node, 0), self.x(node, 1))
        if key not in self.memo and "softcap" in a:  # the capped scores' softmax (lower_llama.py)
            self.memo[key] = self._capped_softmax(node, [(self.inputs["positions"],)] * h, n)
        if key not in self.memo:
            self.memo[key] = self._rows_of(node, range(h))
        return self.memo[key]

    def _rows_of(self, node, heads: range) -> Field:
        """The attention rows of these heads, made anew: the scores as attention computes them (rope,
        alibi, grouped-query)."""
        a = node.attrs
        hd, n = a["head_dim"], self.tmax
        queries, keys, w_q, w_k, suffix = self._score_inputs(node)
        layer = self.layer(("attention_rows", hd, n, repr(a["scale"])) + suffix, lambda: P.Attention(
            w_q, w_k, self.eye(n), self.eye(n), softmax=True, mask="causal", positional="values"))
        rows, row_chunks = self.new(len(heads) * n, n)
        self.call(layer, [[queries[i] for i in heads], [keys[i] for i in heads],
                          [(self.inputs["positions"],)] * len(heads)], row_chunks)
        return rows

    def lower_attention_backward(self, node):
        """∂v_j = Σ_t a_tj ∂o_t (exact under both rules), per aux head: a linear head with query e_j and
        key a_t weighs ∂o_t by a_tj. Grouped-query: each query head's ∂v, then a sum per k/v head."""
        a = node.attrs
        hd, h, n = a["head_dim"], a["heads"], self.tmax
        do = self.x(node, 2).chunks(hd)
        back_layer = self.layer(("attention_backward", hd, n), lambda: P.Attention(
            self.eye(n), self.eye(n), self.eye(hd), self.eye(hd), softmax=False, mask="full", positional="queries"))
        out, chunks = self.new(h * hd, hd)
        per = a.get("row_heads", h)  # passes/attention_rows.py: the rows of `per` heads at a time
        for start in range(0, h, per):
            heads = range(start, min(h, start + per))
            rows = (self._attention_rows(node) if per >= h else self._rows_of(node, heads)).chunks(n)
            self.call(back_layer, [[(self.inputs["positions"],)] * len(heads), [(c,) for c in rows],
                                   [(do[i],) for i in heads]], [chunks[i] for i in heads])
        groups = h // a.get("kv_heads", h)
        if groups > 1:  # k/v head j: the sum of query heads j·groups … (j+1)·groups − 1
            out = self._group_sum(out, hd, groups)
        self.fields[node.name] = out

    def _score_gradient(self, node) -> Field:
        """g_tj = a_tj·(d_tj − Σ_j' a_tj' d_tj'), d_tj = ⟨∂o_t, v_j⟩, per aux head (h·T wide), once per
        attention: a causal linear head (query ∂o_t, key v_j, value e_j) gives d_t; a product, a row sum
        and one gated unit give g_t."""
        a = node.attrs
        hd, h, n = a["head_dim"], a["heads"], self.tmax
        q, k, v, do = (self.x(node, i) for i in range(4))
        key = ("score_gradient", q, k, v, do)
        if key not in self.memo:
            rows = self._attention_rows(node)
            d_layer = self.layer(("attention_score_products", hd, n), lambda: P.Attention(
                self.eye(hd), self.eye(hd), self.eye(n), self.eye(n), softmax=False, mask="causal", positional="values"))
            d, d_chunks = self.new(h * n, n)
            v_heads = v.chunks(hd)  # query head i reads k/v head _kv_head(i)
            self.call(d_layer, [[(c,) for c in do.chunks(hd)], [(v_heads[self._kv_head(a, i)],) for i in range(h)],
                                [(self.inputs["positions"],)] * h], d_chunks)
            weighted = self._product(rows, d, group=n)  # a_tj·d_tj; elementwise per head row (T wide)
            sum_layer = self.layer(("row_sum", n), lambda: P.Linear(torch.ones(1, n, dtype=self.dtype)))
            sums, sum_chunks = self.new(h, 1)
            self.call(sum_layer, [[(c,) for c in weighted.chunks(n)]], sum_chunks)
            # a_t⊙d_t − (Σ_j' a_tj' d_tj')·a_t in one gated unit
            g_layer = self.layer(("score_gradient", n), lambda: P.Gate(
                -torch.ones(n, 1, dtype=self.dtype), self.eye(n), self.eye(n)))
            g, g_chunks = self.new(h * n, n)
            self.call(g_layer, [[(c,) for c in sum_chunks], [(c,) for c in rows.chunks(n)],
                                [(c,) for c in weighted.chunks(n)]], g_chunks)
            self.memo[key] = self._capped_gradient(self._capped_scores(node), g, group=n) if "softcap" in a else g
        return self.memo[key]

    def lower_attention_score_backward(self, node):
        """∂q_t = scale·Σ_j g_tj k_j: a linear head with query g_t and key e_j, value k_j; ∂k_j =
        scale·Σ_t g_tj q_t: query e_j, key g_t, value q_t. Per query head, with the rotated q and k
        (rope) and query head i reading k/v head _kv_head(i); grouped-query: ∂k of a k/v head is the
        sum over its query heads; rope: the result is rotated back (_rotated(inverse=True): Rᵀ)."""
        a = node.attrs
        hd, h, n = a["head_dim"], a["heads"], self.tmax
        g = self._score_gradient(node).chunks(n)
        q, k = (self._rotated(a, self.x(node, i)).chunks(hd) for i in range(2))
        values = [k[self._kv_head(a, i)] for i in range(h)] if a["wrt"] == "q" else q
        pos = [(self.inputs["positions"],)] * h
        positional = "keys" if a["wrt"] == "q" else "queries"  # the side that reads the one-hot positions
        layer = self.layer(("attention_score_backward", hd, n, repr(a["scale"]), positional), lambda: P.Attention(
            self.eye(n), self.eye(n), a["scale"] * self.eye(hd), self.eye(hd), softmax=False, mask="full",
            positional=positional))
        queries, keys = ([(c,) for c in g], pos) if a["wrt"] == "q" else (pos, [(c,) for c in g])
        out, chunks = self.new(h * hd, hd)
        self.call(layer, [queries, keys, [(c,) for c in values]], chunks)
        groups = h // a.get("kv_heads", h)
        if a["wrt"] == "k" and groups > 1:
            out = self._group_sum(out, hd, groups)
        self.fields[node.name] = self._rotated(a, out, inverse=True)

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
                    shift, self.eye(n), self.eye(width), self.eye(width), softmax=False, mask="full", positional="keys"))
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
        one softmax head whose keys and values are the vocabulary rows. Soft-capped logits (Gemma 2):
        _capped_loss_gradient (lower_llama.py)."""
        x, train = self.x(node, 0), self.x(node, 2)
        d = x.width
        next_embed, next_masks = self._next_token()
        weight = self._product(self._product(train, next_masks.part(0, 1)), next_masks.part(1, 1))
        if "softcap" in node.attrs:
            self.fields[node.name] = self._product(weight, self._capped_loss_gradient(node, x, next_embed))
            return
        layer = self.layer(("expected_embedding", d), lambda: P.Attention(
            self.eye(d), self.eye(d), self.eye(d), self.eye(d), softmax=True, mask="full"))
        expected = self.alloc(d)
        self.call(layer, [[(x,)], Read("unembed"), Read("unembed")], [expected])
        self.fields[node.name] = self._product(weight, self._difference(expected, next_embed))
