"""Aux weights <-> prefix tokens: the encoder and the decoder over a prefix layout in JSON form
(backends/torch/prefixes.py). Carried inside the emitted package.
"""

import torch

from .checks import FINGERPRINT, check_prefixes, check_state_dict, fingerprint_tensor


def row_index(ref: dict, n: int):
    """The rows a weight reference selects out of n: rows start:stop, or start:stop of every
    `period` rows (GPT-NeoX's q|k|v, interleaved per head)."""
    start, stop = ref["rows"]
    if ref.get("period") is None:
        return slice(start, stop)
    return (torch.arange(0, n, ref["period"])[:, None] + torch.arange(start, stop)).flatten()


def resolve(ref: dict, params: dict) -> torch.Tensor:
    """The matrix or vector a weight reference names: param (transposed?) [rows start:stop][:, cols]."""
    t = params[ref["name"]]
    if ref["transpose"]:
        t = t.T
    if ref["rows"] is not None:
        t = t[row_index(ref, t.shape[0])]
    if ref.get("cols") is not None:
        t = t[:, ref["cols"][0] : ref["cols"][1]]
    return t


def encode(layout: dict, params: dict, dtype=None) -> dict:
    """θ (Hugging Face names) -> {block: [K, width]} plus "vocab", "positions" (and "unembed"), and the
    layout fingerprint under "tint_layout" (checks.py); in `dtype` (the TinT's), else θ's."""
    check_state_dict(layout, params)
    out = {FINGERPRINT: fingerprint_tensor(layout, params[layout["vocab"]["name"]].device),
           "vocab": resolve(layout["vocab"], params).detach().clone()}
    if layout["positions"] is not None:  # rotary models have no position table
        out["positions"] = resolve(layout["positions"], params).detach().clone()
    if not layout["tied"]:
        out["unembed"] = resolve(layout["unembed"], params).detach().clone()
    for name, block in layout["blocks"].items():
        refs = block["refs"]
        first = resolve(next(iter(refs.values())), params)
        tokens = torch.zeros(block["tokens"], block["width"], dtype=first.dtype, device=first.device)
        if block["kind"] == "linear":
            S, K, c = block["rows"], block["tokens"], block["chunk"]
            C = block["d_in"] // c
            units = torch.zeros(S, K, C, c + 1, dtype=first.dtype, device=first.device)
            units[..., :c] = resolve(refs["weight"], params).reshape(S, K, C, c)  # row r = s·K + j
            if "bias" in refs:
                units[:, :, 0, c] = resolve(refs["bias"], params).reshape(S, K)
            tokens[:, : S * C * (c + 1)] = units.movedim(1, 0).reshape(K, S * C * (c + 1))
            tokens[:, S * C * (c + 1) :] = torch.eye(K, dtype=first.dtype, device=first.device)
        else:
            d = block["d_out"]
            tokens[0, :d] = resolve(refs["gain"], params)
            if "bias" in refs:  # RMSNorm has none: its β stays 0
                tokens[0, d : 2 * d] = resolve(refs["bias"], params)
            tokens[0, 2 * d] = 1.0
        out[name] = tokens
    return {name: t if name == FINGERPRINT or dtype is None else t.to(dtype) for name, t in out.items()}


def decode(layout: dict, prefixes: dict) -> dict:
    """Prefix tokens -> θ in Hugging Face names; batched blocks ([B, K, width]) give [B, *shape]."""
    batch = check_prefixes(layout, prefixes)  # () or (B,)
    vocab = prefixes["vocab"]
    params = {name: torch.empty(*batch, *shape, dtype=vocab.dtype, device=vocab.device)
              for name, shape in layout["shapes"].items()}
    written = set()

    def put(ref, value):
        view = params[ref["name"]].transpose(-1, -2) if ref["transpose"] else params[ref["name"]]
        if ref.get("cols") is not None:  # a column chunk (split_mlp): its columns of every row
            view = view[..., ref["cols"][0] : ref["cols"][1]]
        if ref["rows"] is None:
            view.copy_(value)
        elif view.dim() - len(batch) == 2:
            view[..., row_index(ref, view.shape[-2]), :] = value
        else:
            view[..., row_index(ref, view.shape[-1])] = value
        written.add(ref["name"])

    put(layout["vocab"], prefixes["vocab"])
    if layout["positions"] is not None:
        put(layout["positions"], prefixes["positions"])
    if not layout["tied"]:
        put(layout["unembed"], prefixes["unembed"])
    for name, block in layout["blocks"].items():
        tokens, refs = prefixes[name], block["refs"]
        if block["kind"] == "linear":
            S, K, c = block["rows"], block["tokens"], block["chunk"]
            C = block["d_in"] // c
            units = tokens[..., : S * C * (c + 1)].reshape(*batch, K, S, C, c + 1)
            rows = units.movedim(-4, -3)  # [.., S, K, C, c+1]: row r = s·K + j
            put(refs["weight"], rows[..., :-1].reshape(*batch, block["d_out"], block["d_in"]))
            if "bias" in refs:
                put(refs["bias"], rows[..., 0, -1].reshape(*batch, block["d_out"]))
        else:
            put(refs["gain"], tokens[..., 0, : block["d_out"]])
            if "bias" in refs:
                put(refs["bias"], tokens[..., 0, block["d_out"] : 2 * block["d_out"]])
    missing = sorted(set(params) - written)
    if missing:
        raise ValueError(f"parameters in no prefix block: {', '.join(missing)}")
    return params
