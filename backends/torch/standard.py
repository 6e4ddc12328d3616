"""The standard view: the same TinT as a plain stack of transformer blocks over one residual stream.

Every block is `h ← h + sublayer(h)` over h [B, P, D_sim], with one of three sublayers:
- attention: heads with dense Q, K, V, O over the stream, softmax or linear (raw scores),
  under a fixed mask over positions;
- gated MLP: W_o·[σ(W_a h) ⊙ (W_b h)], σ the identity (a bilinear GLU), sigmoid (the GLU of
  Dauphin et al.), tanh (GTU), GELU, tanh-GELU or ReLU;
- norm: W_o·LN(W_in h), a layer norm over each group of coordinates that W_in selects (a
  grouped pre-norm; the output projection follows it directly).
Nothing else touches the stream: no overwrite, no gather or scatter, no copy.

Positions: [null | vocabulary rows | each prefix block's K tokens | the T input tokens]. The null
position stays 0: a query with no allowed key attends to it and gets 0, so a head acts only on
its own query positions. Coordinates: [token fields (the fast executor's stream, width W) |
block and vocabulary rows (width of the widest block)]; token fields are 0 at every other
position, so per-position sublayers (which only read token fields) give 0 there too. With
tint.passes.shared_rows the rows start lower, at Program.rows_at, on token coordinates that no
block reads ungated at a prefix position (backends/torch/allocate.py: `unshareable`): D_sim =
max(W, rows_at + widest row), and every block still adds 0 at the positions it must not touch.

Correspondence with the fast executor (calls.apply): one call = one block. Its gathers are
the selection inside Q, K, V, W_a, W_b, W_in; its write field is the selection inside O, W_o;
a group (head or chunk) is a head or a set of units; all versions of a prefix block live on
the same positions, so a descent is the residual add of its attention. A gated write (the fast
executor overwrites a field that may hold a dead value) adds −h_c (standard_plan._place_erasures):
folded into the writing MLP's unit that writes c where it can (no more units), else by an erase head
between the dead value's last access and the write (a linear head that attends each token to
itself through the one-hot positions, which live to the end for it), else (the writer reads the dead
value) by erase units σ(one)·(−h_c) in the writing MLP.

This module and its plan (standard_plan.py) import only torch and the runtime (the emitted package
carries their source); they build the view from a TinT's config (tint_config.json's form) and its
primitives.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ir.activations import ACTIVATIONS
from .calls import coordinates
from .checks import contract, within_view_budget
from .standard_plan import NULL, TOKENS, VOCAB, BlockPlan, StreamPlan, factored_size, plan, run_width
from .stream_io import begin, finish


# -- the module ------------------------------------------------------------------------------------
def _add(w: torch.Tensor, rows: slice, part, runs) -> None:
    """w[rows, coordinates of runs] += part: a matrix, None (the identity) or "negate"."""
    cols = torch.tensor(coordinates(runs), dtype=torch.long)
    if part is None or isinstance(part, str):
        part = torch.eye(len(cols), dtype=w.dtype) * (-1.0 if part == "negate" else 1.0)
    w[rows].index_add_(1, cols, part.to(w.dtype))


def _param(t):
    return None if t is None else nn.Parameter(t, requires_grad=False)


def _factor(block: nn.Module, name: str, w: torch.Tensor, columns: list[int] | None) -> None:
    """Store projection `name` ([..., D_sim]) dense, or, given the coordinates it touches and where that
    is smaller, as w[..., columns] and the selection s [k, D_sim] (the low-rank option: exact)."""
    n, d_sim = w[..., 0].numel(), w.shape[-1]
    s = None
    if columns is not None and factored_size(n, len(columns), d_sim) < n * d_sim:
        index = torch.tensor(columns, dtype=torch.long)
        w, s = w[..., index], torch.eye(d_sim, dtype=w.dtype)[index]
    setattr(block, f"w_{name}", _param(w))
    setattr(block, f"s_{name}", _param(s))


def _read(h, s):
    """The stream, or the coordinates a factored projection reads."""
    return h if s is None else h @ s.T


def _write(x, s):
    return x if s is None else x @ s


class AttentionBlock(nn.Module):
    """h + Σ_heads O_h · attention(Q_h h, K_h h, V_h h): softmax or linear heads under a fixed mask."""

    def __init__(self, p: BlockPlan, d_sim: int, one: int, dtype, factored: bool = False):
        super().__init__()
        columns = p.columns(one) if factored else {}
        for name in ("q", "k", "v"):
            w = torch.zeros(len(p.heads), p.heads[0].size(name), d_sim, dtype=dtype)
            for i, head in enumerate(p.heads):
                _add(w[i], slice(None), *getattr(head, name))
            _factor(self, name, w, columns.get(name))  # w_q, w_k, w_v [H, d, D_sim]
        w_o = torch.zeros(len(p.heads), p.heads[0].size("o"), d_sim, dtype=dtype)
        for i, head in enumerate(p.heads):
            matrix, written = head.o
            for runs in written:
                _add(w_o[i], slice(None), None if matrix is None else matrix.T, runs)
        _factor(self, "o", w_o, columns.get("o"))  # [H, dv, D_sim]: O_h transposed
        self.softmax = p.softmax

    def forward(self, h, blocked):
        q = _read(h, self.s_q).unsqueeze(1) @ self.w_q.mT  # [B, H, P, d]
        k = _read(h, self.s_k).unsqueeze(1) @ self.w_k.mT
        v = _read(h, self.s_v).unsqueeze(1) @ self.w_v.mT
        scores = q @ k.mT  # [B, H, P, P]
        if self.softmax:
            weights = scores.masked_fill(blocked, float("-inf")).softmax(-1)
        else:
            weights = scores.masked_fill(blocked, 0.0)
        return h + _write(((weights @ v) @ self.w_o).sum(1), self.s_o)


class MLPBlock(nn.Module):
    """h + W_o·[σ(W_a h) ⊙ (W_b h)]."""

    def __init__(self, p: BlockPlan, d_sim: int, one: int, dtype, factored: bool = False):
        super().__init__()
        n = p.width
        w_a, w_b, w_o = (torch.zeros(n, d_sim, dtype=dtype) for _ in range(3))  # w_o transposed
        row = 0
        for u in p.units:
            rows = slice(row, row + u.n)
            for w, part in ((w_a, u.a), (w_b, u.b)):
                if part is None:
                    w[rows, one] = 1.0  # the constant branch
                else:
                    _add(w, rows, *part)
            matrix, scale, written = u.o
            for runs in written:
                _add(w_o, rows, None if matrix is None else matrix.T, runs)
            w_o[rows] *= scale
            row += u.n
        columns = p.columns(one) if factored else {}
        for name, w in (("a", w_a), ("b", w_b), ("o", w_o)):
            _factor(self, name, w, columns.get(name))
        self.act = p.act

    def forward(self, h):
        units = ACTIVATIONS[self.act](_read(h, self.s_a) @ self.w_a.T) * (_read(h, self.s_b) @ self.w_b.T)
        return h + _write(units @ self.w_o, self.s_o)


class NormBlock(nn.Module):
    """h + W_o·LN(W_in h), the layer norm over each group of coordinates that W_in selects."""

    def __init__(self, p: BlockPlan, d_sim: int, one: int, dtype, factored: bool = False):
        super().__init__()
        self.group = run_width(p.heads[0][0])
        w_in, w_o = (torch.zeros(p.width, d_sim, dtype=dtype) for _ in range(2))  # w_o transposed
        for i, (runs, written) in enumerate(p.heads):
            rows = slice(i * self.group, (i + 1) * self.group)
            _add(w_in, rows, None, runs)
            for out in written:
                _add(w_o, rows, None, out)
        columns = p.columns(one) if factored else {}
        for name, w in (("in", w_in), ("o", w_o)):
            _factor(self, name, w, columns.get(name))
        self.eps = p.eps

    def forward(self, h):
        x = (_read(h, self.s_in) @ self.w_in.T).unflatten(-1, (-1, self.group))
        return h + _write(F.layer_norm(x, (self.group,), None, None, self.eps).flatten(-2) @ self.w_o, self.s_o)


BLOCKS = {"attention": AttentionBlock, "mlp": MLPBlock, "norm": NormBlock}


class Stack(nn.Module):
    """The blocks in order; attention block i reads blocked[mask_index[i]], where True masks a score."""

    def __init__(self, blocks: list[nn.Module], mask_index: list[int]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.mask_index = mask_index

    def forward(self, h, blocked):
        for block, m in zip(self.blocks, self.mask_index):
            h = block(h) if m < 0 else block(h, blocked[m])
        return h


class StandardTinT(nn.Module):
    """The standard view as a module: forward(input_ids, train_mask, prefixes, label_mask=None, lr=None)
    -> (logits, new prefixes), the same contract as the fast TinT. `embed` builds the stream,
    `stack` is the transformer, `masks(T)` its fixed attention masks, `read_out` the output head."""

    def __init__(self, config: dict, stream: StreamPlan, dtype, factored: bool = False):
        super().__init__()
        self.config, self.plan = config, stream
        self.contract = contract(config["layout"], config["max_length"], config.get("label_only", False))
        specs = sorted({b.mask for b in stream.blocks if b.kind == "attention"})
        self.mask_specs = specs
        self.stack = Stack([BLOCKS[b.kind](b, stream.d_sim, stream.one, dtype, factored) for b in stream.blocks],
                           [specs.index(b.mask) if b.kind == "attention" else -1 for b in stream.blocks])

    def positions(self, length: int) -> list[tuple[str, int]]:
        """Each position's kind and its index within the kind: null, vocab rows, blocks, tokens."""
        vocab = self.config["layout"]["shapes"][self.config["layout"]["unembed"]["name"]]
        blocks = self.config["layout"]["blocks"]
        kinds = [(NULL, 1), (VOCAB, vocab[1] if self.config["layout"]["unembed"]["transpose"] else vocab[0])]
        kinds += [(name, b["tokens"]) for name, b in blocks.items()] + [(TOKENS, length)]
        return [(k, i) for k, n in kinds for i in range(n)]

    def masks(self, length: int, device=None) -> torch.Tensor:
        """[M, P, P] booleans, True where a score is masked, one per mask spec (query kind, key kind,
        causal among tokens)."""
        pos = self.positions(length)
        kinds = [k for k, _ in pos]
        index = torch.tensor([i for _, i in pos], device=device)
        out = []
        for query, key, causal in self.mask_specs:
            q = torch.tensor([k == query for k in kinds], device=device)
            k = torch.tensor([k == key for k in kinds], device=device)
            allowed = q[:, None] & k[None, :]
            if causal:
                allowed &= index[None, :] <= index[:, None]
            allowed[:, 0] |= ~allowed.any(-1)  # nothing to attend to: the null position, which holds 0
            out.append(~allowed)
        return torch.stack(out) if out else torch.zeros(0, len(pos), len(pos), dtype=torch.bool, device=device)

    def embed(self, input_ids, train_mask, prefixes, label_mask=None, lr=None) -> torch.Tensor:
        """The stream h0 [B, P, D_sim]: the fast executor's input layer at the tokens (η among its
        inputs; None: the config's), the vocabulary rows and the prefix blocks at theirs."""
        c, layout = self.config, self.config["layout"]
        tokens, unembed, blocks = begin(c["inputs"], c["width"], c["max_length"], layout["position_offset"],
                                        layout["blocks"], input_ids, train_mask, label_mask, prefixes, self.contract,
                                        c["lr"] if lr is None else lr)
        batch, length = input_ids.shape
        d_sim, at = self.plan.d_sim, self.plan.row_start
        parts = [torch.zeros(batch, 1, d_sim, dtype=tokens.dtype, device=tokens.device)]
        for rows in [unembed] + [blocks[f"{name}@0"] for name in layout["blocks"]]:
            parts.append(F.pad(rows, (at, d_sim - at - rows.shape[-1])))
        parts.append(F.pad(tokens, (0, d_sim - c["width"])))
        return torch.cat(parts, 1)

    def read_out(self, h, prefixes):
        """The output head (the final hidden state's field against the unembedding) and the blocks."""
        width, row = self.config["width"], self.plan.row_start
        pos = self.positions(0)
        starts = {}
        for at, (kind, _) in enumerate(pos):
            starts.setdefault(kind, at)
        blocks = {name: h[:, starts[name] : starts[name] + b["tokens"], row : row + b["width"]]
                  for name, b in self.config["layout"]["blocks"].items()}
        unembed = prefixes.get("unembed", prefixes["vocab"])
        unembed = unembed if unembed.dim() == 3 else unembed.expand(h.shape[0], -1, -1)
        return finish(h[:, len(pos) :, :width], self.config["logits"], unembed, prefixes, blocks,
                      self.config.get("logit_softcap"))

    def forward(self, input_ids, train_mask, prefixes, label_mask=None, lr=None):
        h = self.embed(input_ids, train_mask, prefixes, label_mask, lr)
        h = self.stack(h, self.masks(input_ids.shape[1], h.device))
        return self.read_out(h, prefixes)


def standard_view(config: dict, layers, dtype=torch.float64, factored: bool | None = None) -> StandardTinT:
    """The standard view of the TinT with this config (tint_config.json's form) and primitives;
    `factored` (default: the config's low-rank setting) stores each projection that touches fewer
    coordinates than it has rows as two factors."""
    factored = config.get("low_rank", False) if factored is None else factored
    return StandardTinT(config, within_view_budget(plan(config, layers), dtype, factored), dtype, factored)
