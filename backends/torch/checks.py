"""What a TinT is given, checked at the boundary: forward's inputs, prefix dicts, encode's θ.

Like runtime.py (which calls it), its source is carried inside the emitted tint_model.py, so
it imports nothing but torch and the standard library. Every refusal is a TypeError (wrong
kind of object or dtype) or a ValueError (wrong shape, value, or layout) that names the
argument, what it got and what is allowed.

The layout fingerprint: every prefix dict that `encode` makes (and that `forward` returns)
holds, under the key "tint_layout", a tensor with no elements whose *shape* is
[f0, f1, f2, f3, 0]: four 16-bit digits of a hash of the prefix layout (which aux weights
sit in which block, every shape, K, the chunk width, tied embeddings) and of
PREFIX_FORMAT. A shape costs no memory, survives torch.stack (batched prefixes get
[B, f0, …, 0]) and safetensors, and is static under torch.compile. Another checkpoint of
the same architecture has the same layout, so its prefixes pass; the dtype is checked on
the tensors themselves (one floating dtype for the whole dict, the TinT's own in forward).
"""

import hashlib
import json
import os

import torch

ID_DTYPES = (torch.int64, torch.int32)
PREFIX_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
FINGERPRINT = "tint_layout"  # the prefix dict's key holding the layout fingerprint
PREFIX_FORMAT = "tintc.prefixes/1"


def fingerprint(layout: dict) -> tuple:
    """Four 16-bit digits of a hash of the layout and the prefix format."""
    text = json.dumps({"format": PREFIX_FORMAT, "layout": layout}, sort_keys=True)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return tuple(int.from_bytes(digest[i : i + 2], "big") for i in range(0, 8, 2))


def fingerprint_tensor(layout: dict, device=None) -> torch.Tensor:
    return torch.empty(*fingerprint(layout), 0, dtype=torch.uint8, device=device)


def _ref_shape(ref: dict, shapes: dict) -> tuple:
    """The shape of the matrix a weight reference names (runtime.resolve without the data)."""
    shape = tuple(shapes[ref["name"]])
    if ref["transpose"]:
        shape = shape[::-1]
    if ref["rows"] is not None:
        blocks = shape[0] // ref["period"] if ref.get("period") else 1
        shape = ((ref["rows"][1] - ref["rows"][0]) * blocks, *shape[1:])
    if ref.get("cols") is not None:
        shape = (shape[0], ref["cols"][1] - ref["cols"][0])
    return shape


def contract(layout: dict, max_length: int, label_only: bool) -> dict:
    """What forward accepts, computed once per TinT: each prefix tensor's shape, the layout
    fingerprint, the vocabulary size, the longest input, and whether label_mask is required."""
    tables = {"vocab": _ref_shape(layout["vocab"], layout["shapes"])}
    if layout["positions"] is not None:  # rotary models have no position table
        tables["positions"] = _ref_shape(layout["positions"], layout["shapes"])
    if not layout["tied"]:
        tables["unembed"] = _ref_shape(layout["unembed"], layout["shapes"])
    blocks = {name: (block["tokens"], block["width"]) for name, block in layout["blocks"].items()}
    routing = {name: block["width"] - block["tokens"] for name, block in layout["blocks"].items()
               if block["kind"] == "linear"}  # where each linear block's one-hot positions start
    return {"fingerprint": fingerprint(layout), "prefixes": {**tables, **blocks}, "vocab": tables["vocab"][0],
            "max_length": max_length, "label_only": label_only, "routing": routing}


def _shape(shape) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def _got(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {_shape(value.shape)}"
    return f"a {type(value).__name__}"


def check_prefixes(expected: dict, prefixes, batch: int | None = None, dtype: torch.dtype | None = None) -> tuple:
    """Prefix dict against a contract (or a layout): fingerprint, keys, shapes, one floating
    dtype (`dtype`, the TinT's, when given), one batch size (unbatched tensors hold one checkpoint for
    every sequence). Returns the batch shape: () when every tensor is unbatched, else (B,)."""
    if "fingerprint" not in expected:  # a layout: decode's check
        expected = contract(expected, 0, False)
    if not isinstance(prefixes, dict):
        raise TypeError(f"prefixes: got {_got(prefixes)}; allowed: the dict this TinT's encode() returns")
    stamp = prefixes.get(FINGERPRINT)
    want = (*expected["fingerprint"], 0)
    if not isinstance(stamp, torch.Tensor):
        raise ValueError(f"prefixes: got no {FINGERPRINT!r} layout fingerprint; allowed: a dict made by this TinT's "
                         "encode() or returned by its forward()")
    if stamp.dim() < 5 or tuple(stamp.shape[-5:]) != want:
        raise ValueError(f"prefixes[{FINGERPRINT!r}]: got layout fingerprint {_shape(stamp.shape[-5:])}; allowed: "
                         f"{_shape(want)} (these prefixes were made for another layout: another architecture, "
                         "shapes, K or format)")
    shapes = expected["prefixes"]
    unknown = sorted(set(prefixes) - set(shapes) - {FINGERPRINT})
    missing = [name for name in shapes if name not in prefixes]
    if unknown or missing:
        raise ValueError(f"prefixes: got keys {', '.join(map(repr, unknown)) or 'none'} that this TinT does not take "
                         f"and lacks {', '.join(map(repr, missing)) or 'none'}; allowed: exactly "
                         f"{', '.join(map(repr, shapes))}, {FINGERPRINT!r}")
    own, batches = dtype, set()
    for name, shape in shapes.items():
        t = prefixes[name]
        if not isinstance(t, torch.Tensor) or t.dtype not in PREFIX_DTYPES:
            raise TypeError(f"prefixes[{name!r}]: got {_got(t)}; allowed: a float32, float64 or bfloat16 tensor (the "
                            "dtypes a TinT computes in)")
        dtype = dtype or t.dtype
        if t.dtype != dtype:
            raise TypeError(f"prefixes[{name!r}]: got dtype {t.dtype}; allowed: {dtype}, "
                            + ("the dtype of this TinT's weights (its encode() casts θ to it; load(dtype=) or .to() "
                               "makes a TinT of another dtype)" if own else "the dtype of the other prefixes"))
        if t.dim() not in (2, 3) or tuple(t.shape[-2:]) != shape:
            raise ValueError(f"prefixes[{name!r}]: got shape {_shape(t.shape)}; allowed: {_shape(shape)} "
                             f"or [B, {_shape(shape)[1:]}")
        if t.dim() == 3:
            batches.add(t.shape[0])
    if batch is not None and batches - {batch}:
        raise ValueError(f"prefixes: got per-sequence prefixes for {sorted(batches)} sequences; allowed: {batch} "
                         "(the batch of input_ids), or unbatched [K, width]")
    if len(batches) > 1:
        raise ValueError(f"prefixes: got batch sizes {sorted(batches)}; allowed: one batch size for every block")
    return (batches.pop(),) if batches else ()


def _check_mask(name: str, mask, input_ids) -> None:
    if not isinstance(mask, torch.Tensor) or mask.is_complex():
        raise TypeError(f"{name}: got {_got(mask)}; allowed: a bool (or 0/1) tensor of shape {_shape(input_ids.shape)}")
    if tuple(mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"{name}: got shape {_shape(mask.shape)}; allowed: {_shape(input_ids.shape)}, the shape of "
                         "input_ids (no broadcasting)")


def _check_mask_values(name: str, mask) -> None:
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        bad = mask[(mask != 0) & (mask != 1)][0].item()
        raise ValueError(f"{name}: got value {bad}; allowed: True/False or 0/1")


def check_inputs(expected: dict, input_ids, train_mask, label_mask, prefixes, dtype: torch.dtype | None = None) -> None:
    """forward's arguments against the TinT's contract (`dtype`: its weights'). The value checks (ids in
    range, masks 0/1) are skipped while torch.compile traces, as they branch on data; shapes are checked always."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in ID_DTYPES:
        raise TypeError(f"input_ids: got {_got(input_ids)}; allowed: an int64 or int32 tensor [B, T] (the index "
                        "dtypes of an embedding)")
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids: got shape {_shape(input_ids.shape)}; allowed: [B, T] with B, T >= 1")
    if input_ids.shape[1] > expected["max_length"]:
        raise ValueError(f"input_ids: got length {input_ids.shape[1]}; allowed: at most the TinT's max_length "
                         f"{expected['max_length']}")
    _check_mask("train_mask", train_mask, input_ids)
    if expected["label_only"] and label_mask is None:
        raise ValueError("label_mask: got None; allowed: a bool [B, T] mask (this TinT was compiled for loss: label_only)")
    if not expected["label_only"] and label_mask is not None:
        raise ValueError(f"label_mask: got {_got(label_mask)}; allowed: None (this TinT was compiled for loss: "
                         "context, which trains on every train position)")
    if label_mask is not None:
        _check_mask("label_mask", label_mask, input_ids)
    check_prefixes(expected, prefixes, batch=input_ids.shape[0], dtype=dtype)
    if torch.compiler.is_compiling():
        return
    low, high = input_ids.min().item(), input_ids.max().item()
    if low < 0 or high >= expected["vocab"]:
        raise ValueError(f"input_ids: got id {low if low < 0 else high}; allowed: 0 to {expected['vocab'] - 1} "
                         "(the vocabulary)")
    _check_mask_values("train_mask", train_mask)
    if label_mask is not None:
        _check_mask_values("label_mask", label_mask)
    for name, start in expected["routing"].items():
        _check_routing(name, start, prefixes[name])


def _check_routing(name: str, start: int, block: torch.Tensor) -> None:
    """A linear block's last K coordinates are the one-hot of each prefix token's position, as encode()
    writes them and every descent keeps them: the TinT routes by them, and its fast executor does not
    multiply by them (primitives.Attention's `positional`), so other numbers there are refused."""
    routing = block[..., start:]
    tokens = routing.shape[-1]  # one nonzero per token, and it is the 1 on the diagonal: a read of K², no K² made
    onehot = bool((routing.count_nonzero(-1) == 1).all()) and bool((routing.diagonal(0, -2, -1) == 1).all())
    if not onehot:
        raise ValueError(f"prefixes[{name!r}]: got coordinates {start} to {start + tokens - 1} that are not the "
                         f"one-hot of each token's position (0 to {tokens - 1}); allowed: the identity that encode() "
                         "writes there (the TinT routes by it)")


def check_lr(lr, batch: int) -> None:
    """forward's η: a real number, or a float tensor of shape [] (every sequence) or [B] (one per
    sequence); finite. Its sign is not checked (η = 0 leaves θ as it is)."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float, torch.Tensor)):
        raise TypeError(f"lr: got {_got(lr)}; allowed: a real number, or a float tensor of shape [] or [B] (one "
                        "learning rate per sequence)")
    if isinstance(lr, torch.Tensor) and (not lr.is_floating_point() or tuple(lr.shape) not in ((), (batch,))):
        raise TypeError(f"lr: got {_got(lr)}; allowed: a float tensor of shape [] or [{batch}] (one learning rate "
                        "per sequence of input_ids)")
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(torch.as_tensor(lr)).all()):
        raise ValueError(f"lr: got {lr.tolist() if isinstance(lr, torch.Tensor) else lr}; allowed: finite "
                         "learning rates")


def check_state_dict(layout: dict, params) -> None:
    """encode's θ: every aux parameter of the layout, with its shape and one floating dtype
    (extra entries, such as buffers of a full state dict, are ignored)."""
    if not isinstance(params, dict):
        raise TypeError(f"state_dict: got {_got(params)}; allowed: a dict of Hugging Face parameter names to tensors")
    missing = [name for name in layout["shapes"] if name not in params]
    if missing:
        raise ValueError(f"state_dict: lacks {', '.join(map(repr, missing))}; allowed: every parameter of the "
                         "architecture this TinT was compiled for")
    dtype = None
    for name, shape in layout["shapes"].items():
        t = params[name]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"state_dict[{name!r}]: got {_got(t)}; allowed: a floating-point tensor")
        dtype = dtype or t.dtype
        if t.dtype != dtype:
            raise TypeError(f"state_dict[{name!r}]: got dtype {t.dtype}; allowed: {dtype}, the dtype of the others")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"state_dict[{name!r}]: got shape {_shape(t.shape)}; allowed: {_shape(shape)}")


# -- the standard view's size ------------------------------------------------------------------
VIEW_BUDGET_FRACTION = 0.5  # of the machine's memory: the dense standard view must leave room to run it


def memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def within_view_budget(stream, dtype, factored: bool, budget: int | None = None):
    """The stream plan, or a MemoryError before any dense matrix is made when the standard view's
    parameters (its blocks' dense projections over D_sim, in `dtype`) would exceed the budget
    (default: half the machine's memory). Names both sizes."""
    if budget is None:
        memory = memory_bytes()
        budget = None if memory is None else int(memory * VIEW_BUDGET_FRACTION)
    parameters = sum(b.dense_parameters(stream.d_sim, stream.one, factored) for b in stream.blocks)
    size = parameters * torch.empty((), dtype=dtype).element_size()
    if budget is not None and size > budget:
        raise MemoryError(f"standard(): the standard view would hold {parameters:,} dense {dtype} parameters "
                          f"({size / 2**30:.1f} GiB over D_sim={stream.d_sim}, {len(stream.blocks)} blocks); "
                          f"allowed: at most the budget of {budget / 2**30:.1f} GiB (half this machine's memory). "
                          "The fast TinT (load()) computes the same function in far less")
    return stream


# -- the package digest ------------------------------------------------------------------------
# tint_model.py, tint_config.json and weights.safetensors each record the digests of all three
# ({file: sha256}); each part's digest leaves out the record itself (the PACKAGE line, the
# "package" key, the safetensors metadata), so a file can carry the digest of its own content.
# load() recomputes them and refuses a package whose parts were edited or come from two compiles.


def source_digest(text: str) -> str:
    lines = ["PACKAGE = None" if line.startswith("PACKAGE = ") else line for line in text.split("\n")]
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def config_digest(config: dict) -> str:
    rest = {k: v for k, v in config.items() if k != "package"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


# Bounds on a weights header, checked before it is parsed: a TinT's header lists one entry per
# primitive tensor (thousands at GPT-2 shapes), far below these; a crafted one is refused at once.
MAX_HEADER_BYTES = 1 << 26  # 64 MiB
MAX_HEADER_ENTRIES = 1 << 18


def _bad_weights(what: str) -> ValueError:
    return ValueError(f"weights.safetensors: {what}; allowed: the safetensors file tintc wrote")


def weights_header(data: bytes) -> dict:
    """The header of a safetensors file's bytes, refused (ValueError naming the file) when its
    size, entry count, JSON or layout is not what a safetensors writer makes."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < 8:
        raise _bad_weights(f"got {len(data) if isinstance(data, (bytes, bytearray)) else 'no'} bytes, too few "
                           "for a header")
    size = int.from_bytes(data[:8], "little")
    if size > min(len(data) - 8, MAX_HEADER_BYTES):
        raise _bad_weights(f"got a header size of {size} bytes in a file of {len(data)}; the limit is "
                           f"{MAX_HEADER_BYTES}")
    raw = bytes(data[8 : 8 + size])
    entries = raw.count(b"{")  # every entry is an object: an upper bound, counted without parsing
    if entries > MAX_HEADER_ENTRIES + 2:
        raise _bad_weights(f"got a header of about {entries} entries; the limit is {MAX_HEADER_ENTRIES}")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise _bad_weights(f"got a header that is not JSON ({type(err).__name__}: {str(err)[:100]})") from None
    if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
        raise _bad_weights("got a header that is not a mapping of tensor names to entries")
    metadata = header.get("__metadata__")
    if metadata is not None and not all(isinstance(v, str) for v in metadata.values()):
        raise _bad_weights("got __metadata__ values that are not strings")
    return header


def weights_digest(data: bytes) -> tuple:
    """(digest, recorded package or None) of a safetensors file's bytes: the tensor entries of its
    header and its data, not its metadata."""
    header = weights_header(data)
    size = int.from_bytes(data[:8], "little")
    metadata = header.pop("__metadata__", None) or {}
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode("utf-8"))
    digest.update(data[8 + size :])
    recorded = metadata.get("tintc_package")
    try:
        return digest.hexdigest(), None if recorded is None else json.loads(recorded)
    except (ValueError, RecursionError):
        raise _bad_weights("got a tintc_package record that is not JSON") from None


def check_package(package: dict, source: str, config: dict, weights: bytes) -> None:
    """The three parts against the digests the code records (`package`); the error names the file."""
    found = {"tint_model.py": (source_digest(source), package),
             "tint_config.json": (config_digest(config), config.get("package")),
             "weights.safetensors": weights_digest(weights)}
    for name, (digest, recorded) in found.items():
        if digest != package.get(name) or recorded != package:
            raise ValueError(f"{name}: its content does not match this package's digest (edited, or from another "
                             "compile); allowed: the three files as one tintc compile wrote them")
