"""The start and the end of a TinT's forward pass: the input layer that builds the token stream,
and the output head. Carried inside the emitted package.

Streams by name (tint_config.json's form): "tokens", "unembed", and each prefix block's versions
"block@n" (version 0 from encode, one more per descent); block_stream writes such a name, and
backends/torch/program.py's Stream is the typed form every compiler module uses.
"""

import ctypes
import mmap
import sys

import torch

from .checks import FINGERPRINT, check_inputs, check_lr
from .projection import matmul

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4  # Linux's value
_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def block_stream(block: str, version: int) -> str:
    """The name of a prefix block's stream at a version."""
    return f"{block}@{version}"


def begin(fields: dict, width: int, max_length: int, position_offset: int, blocks, input_ids, train_mask,
          label_mask, prefixes: dict, contract: dict, lr, dtype=None):
    """Check the input against the TinT's contract (checks.py) and its weights' dtype, let every input hold
    one checkpoint for all sequences or one per sequence, and return the token stream after the input layer,
    the unembedding and the prefix streams at version 0. `lr`: η, one for all sequences or one each."""
    check_inputs(contract, input_ids, train_mask, label_mask, prefixes, dtype)
    batch, length = input_ids.shape
    check_lr(lr, batch)
    batched = {name: t if t.dim() == 3 else t.expand(batch, -1, -1)
               for name, t in prefixes.items() if name != FINGERPRINT}
    unembed = batched.get("unembed", batched["vocab"])
    h = input_layer(fields, width, position_offset, input_ids, train_mask, label_mask, batched.get("positions"),
                    batched["vocab"], unembed, lr)  # [B, T, width]
    return h, unembed, {block_stream(block, 0): batched[block] for block in blocks}


def finish(h, logits_field, unembed, prefixes: dict, final_blocks: dict, softcap: float | None = None):
    """The output head (the final hidden state's field against the unembedding; softcap c: capped
    c·tanh(z/c), as the aux model's own head, Gemma 2's) and the new prefixes: the embedding tables as
    given, each block at its last version."""
    start, size = logits_field
    logits = matmul(h[..., start : start + size], unembed.transpose(-1, -2))  # [B, T, V]
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    new_prefixes = {name: prefixes[name] for name in ("vocab", "positions", "unembed", FINGERPRINT) if name in prefixes}
    return logits, {**new_prefixes, **final_blocks}


def input_layer(fields: dict, width: int, position_offset: int, input_ids, train_mask, label_mask,
                positions, vocab, unembed, lr):
    """The TinT's embedding [B, T, width]: token and position rows of the aux tables, constants one
    and zero, one-hot positions, the train and label masks, and the learning rate η (a float or one
    per sequence, [B]) at every token, each in its field (start, width). η is an input like the masks,
    so the TinT's weights do not depend on it: the descents multiply it in."""
    batch, length = input_ids.shape
    h = torch.zeros(batch, length, width, dtype=vocab.dtype, device=vocab.device)

    def at(name):
        start, size = fields[name]
        return slice(start, start + size)

    rows = torch.arange(batch, device=input_ids.device)[:, None]
    h[..., at("token_embed")] = vocab[rows, input_ids]
    if positions is not None:  # rotary models have none: q and k are rotated inside attention
        h[..., at("pos_embed")] = positions[:, position_offset : position_offset + length]
    if "target_embed" in fields:
        h[..., at("target_embed")] = unembed[rows, input_ids]
    h[..., fields["one"][0]] = 1.0
    start = fields["positions"][0]
    h[..., start : start + length] = torch.eye(length, dtype=h.dtype, device=h.device)
    h[..., fields["train"][0]] = train_mask.to(h.dtype)
    h[..., fields["label"][0]] = 1.0 if label_mask is None else label_mask.to(h.dtype)
    h[..., fields["lr"][0]] = lr.reshape(-1, 1).to(h) if isinstance(lr, torch.Tensor) else lr
    return h


def release_beyond(h, width: int) -> None:
    """Let go of the token stream beyond its first `width` coordinates, which are never read or written
    again (backends/torch/allocate.py's narrowing), in place and without a copy: on Linux the whole pages
    of each position's row past `width` go back to the system (madvise MADV_DONTNEED: an untouched
    page of a private mapping reads as zeros, and nothing touches these). Elsewhere (another system, a
    GPU, a stream that is not one contiguous block, under torch.compile, which plans its own buffers) the
    stream is kept whole: the same numbers, more memory."""
    if torch.compiler.is_compiling() or _LIBC is None or h.device.type != "cpu" or not h.is_contiguous() \
            or width >= h.shape[-1]:
        return
    size, row = h.element_size(), h.shape[-1] * h.element_size()
    for r in range(h.numel() // h.shape[-1]):
        start = h.data_ptr() + r * row
        low = -(-(start + width * size) // _PAGE) * _PAGE  # the first whole page past `width`
        high = (start + row) // _PAGE * _PAGE
        if high > low:
            _LIBC.madvise(ctypes.c_void_p(low), ctypes.c_size_t(high - low), _MADV_DONTNEED)


def stream_block(name: str) -> tuple[str, int]:
    """(block, version) of a prefix block's stream name (block_stream's inverse)."""
    block, version = name.rsplit("@", 1)
    return block, int(version)
