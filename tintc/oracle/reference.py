"""The oracle: dynamic evaluation in plain PyTorch, exact (g) and approximate (ĝ).

    θ_0 = θ;  θ_{n+1} = θ_n − η·grad(θ_n);  output = logits of θ_N on the whole input

`exact_gd` takes the gradient g by autograd through the Hugging Face model itself.
`approx_gd` runs the IR interpreter with the TinT's backward rules swapped in as
ordinary tensor code (custom autograd functions), each switchable on its own:
stop-gradient attention, finite-difference backward of the norms (layer norm and RMSNorm)
and of the activation (also a gated MLP's). With
every rule `exact`, ĝ = g, which ties the IR to the HF model.

The loss is the next-token cross-entropy *summed* over positions t whose token and
next token are both in the train segment (and, for `label_only`, whose next token
is a label). The sequences of a batch are independent contexts: each trains its own
copy of θ, as each sequence given to a TinT does.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ir import rules
from ir.graph import Graph
from ir.interpret import Interpreter
from ir.passes.select_train import select_train, trained_refs

PAPER_KINDS = ("attn_v", "attn_o", "mlp_in", "mlp_out", "norm_bias")


@dataclass(frozen=True)
class Approximations:
    """The backward rules the TinT uses (defaults: the paper's)."""

    attention: str = "stop_gradient"  # stop_gradient | exact
    layer_norm: str = "finite_difference"  # finite_difference | exact
    activation: str = "finite_difference"  # finite_difference | exact
    scale: float = 1000.0  # N of the finite differences


EXACT = Approximations("exact", "exact", "exact")


@dataclass(frozen=True)
class TrainSettings:
    lr: float = 1e-3
    steps: int = 1
    layers: tuple[int, ...] | None = None  # None: every layer
    kinds: tuple[str, ...] = PAPER_KINDS
    loss: str = "context"  # context | label_only (then pass a label mask)
    approximations: Approximations = field(default_factory=Approximations)

    @classmethod
    def from_config(cls, cfg, n_layer: int) -> "TrainSettings":
        t = cfg.tint.train
        a = cfg.tint.approximations
        return cls(lr=t.lr, steps=t.steps, layers=tuple(cfg.trained_layers(n_layer)), kinds=tuple(t.kinds),
                   loss=t.loss, approximations=Approximations(a.attention, a.layer_norm, a.activation, a.scale))


@dataclass
class GDResult:
    params: dict[str, torch.Tensor]  # every aux parameter after the last step, per sequence: [B, *shape]
    logits: torch.Tensor  # [B, T, V] of the updated model on the whole input
    logits_before: torch.Tensor  # [B, T, V] of θ_0
    trained: list[str]  # names of the parameters that were (partly) updated


# -- the loss ---------------------------------------------------------------------------
def summed_loss(logits: torch.Tensor, input_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")  # [B, T-1]
    return (ce * weights[:, :-1].to(ce.dtype)).sum()


# -- the approximate backward rules as autograd functions (formulas in ir/rules.py) -----
class FiniteDifferenceLayerNorm(torch.autograd.Function):
    """y = f(x)·γ + β with f the normalisation; ∂x ≈ N·[f(x + γ⊙∂y/N) − f(x)]."""

    @staticmethod
    def forward(ctx, x, gain, bias, eps, scale):
        xhat = rules.normalise(x, eps)
        ctx.save_for_backward(x, xhat, gain)
        ctx.eps, ctx.scale = eps, scale
        return xhat * gain + bias

    @staticmethod
    def backward(ctx, dy):
        x, xhat, gain = ctx.saved_tensors
        dx = rules.layer_norm_backward(x, gain, dy, ctx.eps, "finite_difference", ctx.scale)
        flat = dy.reshape(-1, dy.shape[-1])
        dgain = (flat * xhat.reshape(flat.shape)).sum(0)
        return dx, dgain, flat.sum(0), None, None


class FiniteDifferenceRMSNorm(torch.autograd.Function):
    """y = f(x)·γ with f the RMS normalisation (forward as HF computes it, `upcast` included);
    ∂x ≈ N·[f(x + γ⊙∂y/N) − f(x)] in the working dtype."""

    @staticmethod
    def forward(ctx, x, gain, eps, upcast, scale, heads):
        xhat = rules.rms_normalise_as(x, eps, upcast, heads)
        ctx.save_for_backward(x, xhat, gain)
        ctx.eps, ctx.scale, ctx.heads = eps, scale, heads
        return gain.repeat(heads) * xhat

    @staticmethod
    def backward(ctx, dy):
        x, xhat, gain = ctx.saved_tensors
        dx = rules.rms_norm_backward(x, gain, dy, ctx.eps, "finite_difference", ctx.scale, ctx.heads)
        dgain = (dy * xhat).reshape(-1, gain.shape[-1]).sum(0)  # heads: every part's sum
        return dx, dgain, None, None, None, None


class FiniteDifferenceActivation(torch.autograd.Function):
    """y = σ(x); ∂x ≈ N·[σ(x + ∂y/N) − σ(x)]."""

    @staticmethod
    def forward(ctx, x, fn, scale):
        ctx.save_for_backward(x)
        ctx.fn, ctx.scale = fn, scale
        return rules.ACTIVATION_FNS[fn](x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return rules.activation_backward(x, dy, ctx.fn, "finite_difference", ctx.scale), None, None


def stop_gradient_attention(q, k, v, scale: float, causal: bool, window: int | None = None, bias=None,
                            upcast=None, softcap=None):
    """Softmax attention whose scores are constants for autograd: only v gets a gradient (with
    grouped-query attention, a k/v head's gradient sums over the query heads that share it)."""
    return rules.attention_probs(q, k, scale, causal, window=window, bias=bias, upcast=upcast,
                                 softcap=softcap).detach() @ v


class ApproxInterpreter(Interpreter):
    """The IR interpreter with the TinT's backward rules; forward values are unchanged."""

    def __init__(self, graph: Graph, approximations: Approximations):
        super().__init__(graph)
        self.approx = approximations

    def layer_norm(self, x, gain, bias, eps):
        if self.approx.layer_norm == "finite_difference":
            return FiniteDifferenceLayerNorm.apply(x, gain, bias, eps, self.approx.scale)
        return super().layer_norm(x, gain, bias, eps)

    def rms_norm(self, x, gain, eps, upcast=None, heads=1):  # the layer_norm rule covers every normalisation
        if self.approx.layer_norm == "finite_difference":
            return FiniteDifferenceRMSNorm.apply(x, gain, eps, upcast, self.approx.scale, heads)
        return super().rms_norm(x, gain, eps, upcast, heads)

    def activation(self, x, fn):
        if self.approx.activation == "finite_difference":
            return FiniteDifferenceActivation.apply(x, fn, self.approx.scale)
        return super().activation(x, fn)

    def attention(self, q, k, v, scale, causal, window=None, bias=None, upcast=None, softcap=None):
        if self.approx.attention == "stop_gradient":  # the soft-capped scores are constants too
            return stop_gradient_attention(q, k, v, scale, causal, window=window, bias=bias, upcast=upcast,
                                           softcap=softcap)
        return super().attention(q, k, v, scale, causal, window=window, bias=bias, upcast=upcast, softcap=softcap)


# -- the SGD loop -----------------------------------------------------------------------
def update_masks(graph: Graph, params: dict[str, torch.Tensor], settings: TrainSettings) \
        -> dict[str, torch.Tensor | None]:
    """For every (partly) trained parameter, a 0/1 mask of its trained entries, or None where every entry
    is trained (no mask is held: at 1B+ a mask per tensor would be one more copy of θ).

    GPT-2 fuses q|k|v in one tensor, so training V alone updates a slice of it."""
    layers = list(range(graph.attrs["n_layer"])) if settings.layers is None else list(settings.layers)
    selected = select_train(graph, layers, list(settings.kinds)).graph
    refs: dict[str, list] = {}
    for ref in trained_refs(selected):
        refs.setdefault(ref.name, []).append(ref)
    masks: dict[str, torch.Tensor | None] = {}
    for name, named_refs in refs.items():
        mask = torch.zeros_like(params[name])
        for ref in named_refs:
            view = mask.T if ref.transpose else mask
            view[ref.row_index(view.shape[0])] = 1.0
        masks[name] = None if bool(mask.all()) else mask
    return masks


def _descend(forward, params, input_ids, train_mask, label_mask, settings, masks, before=True,
             in_place: bool = False) -> GDResult:
    """SGD on each sequence of the batch separately: every sequence is its own context.
    before=False skips the forward with θ_0 (logits_before is then None), as timings want.
    in_place: see _descend_one (one sequence only: it consumes θ)."""
    if in_place and input_ids.shape[0] != 1:
        raise ValueError(f"in_place descent: got a batch of {input_ids.shape[0]} sequences; allowed: 1 (it "
                         "overwrites θ, which each sequence starts from)")
    runs = []
    for b in range(input_ids.shape[0]):
        labels = None if label_mask is None or settings.loss != "label_only" else label_mask[b : b + 1]
        runs.append(_descend_one(forward, params, input_ids[b : b + 1], train_mask[b : b + 1], labels,
                                 settings, masks, before, in_place))
    one = len(runs) == 1  # a view, not a copy of θ (untrained entries then share the model's storage)
    return GDResult(
        params={n: runs[0][0][n].unsqueeze(0) if one else torch.stack([r[0][n] for r in runs]) for n in params},
        logits=torch.cat([r[1] for r in runs]),
        logits_before=torch.cat([r[2] for r in runs]) if before else None,
        trained=list(masks),
    )


def _descend_one(forward, params, input_ids, train_mask, label_mask, settings, masks, before, in_place=False):
    """in_place: θ's trained tensors are the caller's to overwrite; each steps as soon as its gradient is
    complete (a post-accumulate-grad hook), so no step holds θ_n, θ_{n+1} and the gradients at once (what
    lets tensor code check a 1B-class model in float64 here: scripts/verify_at_scale.py)."""
    weights = rules.loss_weights(train_mask, label_mask)
    params = {n: p.detach() for n, p in params.items()}
    logits_before = None
    if before:
        with torch.no_grad():
            logits_before = forward(params, input_ids)
    if in_place:
        for _ in range(settings.steps):
            _step_in_place(forward, params, input_ids, weights, settings.lr, masks)
        with torch.no_grad():
            return params, forward(params, input_ids), logits_before
    for _ in range(settings.steps):
        leaves = dict(params)
        for name in masks:  # a new leaf on the same storage: nothing is copied, nothing written in place
            leaves[name] = params[name].detach().requires_grad_(True)
        loss = summed_loss(forward(leaves, input_ids), input_ids, weights)
        grads = list(torch.autograd.grad(loss, [leaves[n] for n in masks]))
        for i, (name, mask) in enumerate(masks.items()):
            step = settings.lr * grads[i]  # not in place: two leaves may receive one gradient tensor
            grads[i] = None  # dropped once applied: θ_n, θ_{n+1} and the gradients not yet applied
            params[name] = leaves[name].detach() - (step if mask is None else step * mask)
    with torch.no_grad():
        logits = forward(params, input_ids)
    return params, logits, logits_before


def _step_in_place(forward, params, input_ids, weights, lr, masks) -> None:
    """One SGD step that writes θ_{n+1} over θ_n tensor by tensor, each once its gradient is complete:
    autograd has then run every node that saved it, so nothing reads it afterwards."""
    def step(leaf, mask):
        with torch.no_grad():
            leaf.sub_(lr * leaf.grad if mask is None else lr * leaf.grad * mask)
        leaf.grad = None

    leaves = {name: params[name].requires_grad_(True) for name in masks}
    hooks = [leaf.register_post_accumulate_grad_hook(lambda p, m=masks[name]: step(p, m))
             for name, leaf in leaves.items()]
    try:
        summed_loss(forward(params, input_ids), input_ids, weights).backward()
    finally:
        for hook in hooks:
            hook.remove()
        for name, leaf in leaves.items():
            params[name] = leaf.detach().requires_grad_(False)


def exact_gd(model, graph: Graph, input_ids, train_mask, settings: TrainSettings, label_mask=None,
             before: bool = True, norms_as_graph: bool = True) -> GDResult:
    """g by autograd through the HF model (functional: the model is not modified): per step a
    forward, a backward and the update, then the evaluation forward (and, with before=True, the
    forward with θ_0 for the logits before training). RMSNorm modules run as the graph says
    (see _norms_as_in_graph); norms_as_graph=False runs them as HF wrote them."""
    params = dict(model.named_parameters())

    def forward(p, ids):
        with _norms_as_in_graph(model, graph) if norms_as_graph else nullcontext():
            return functional_call(model, p, (ids,), {"use_cache": False}).logits

    masks = update_masks(graph, params, settings)
    return _descend(forward, params, input_ids, train_mask, label_mask, settings, masks, before)


@contextmanager
def _norms_as_in_graph(model, graph: Graph):
    """HF's RMSNorm casts its input to float32 whatever the model's dtype; where the graph has dropped
    that cast (tintc.pipeline.trace: a float64 TinT normalises in float64), the module computes HF's
    formula in its input dtype instead, so that exact GD is the gradient of the function the TinT
    computes and not of HF's float32 rounding. Modules whose graph node keeps `upcast` run unchanged."""
    patched = []
    for node in graph.nodes():
        if node.kind == "rms_norm" and "upcast" not in node.attrs:
            module = model.get_submodule(node.attrs["module"])
            eps, offset = node.attrs["eps"], node.attrs.get("gain_offset")  # Gemma 2's gain: offset + w
            module.forward = lambda x, m=module, eps=eps, c=offset: (m.weight if c is None else c + m.weight) * \
                rules.rms_normalise(x, eps)
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward  # back to the class's forward


def approx_gd(graph: Graph, params: dict[str, torch.Tensor], input_ids, train_mask, settings: TrainSettings,
              label_mask=None, before: bool = True, in_place: bool = False) -> GDResult:
    """ĝ: the IR interpreter with the approximate backward rules of `settings.approximations`
    (before=False skips the forward with θ_0, as in exact_gd; in_place: the trained tensors of `params`
    are overwritten with θ_N, one sequence only, see _descend_one)."""
    interpreter = ApproxInterpreter(graph, settings.approximations)
    masks = update_masks(graph, params, settings)
    return _descend(interpreter.run, dict(params), input_ids, train_mask, label_mask, settings, masks, before,
                    in_place)


def with_approximations(settings: TrainSettings, **changes) -> TrainSettings:
    """The same settings with some backward rules changed, e.g. attention="exact"."""
    return replace(settings, approximations=replace(settings.approximations, **changes))
