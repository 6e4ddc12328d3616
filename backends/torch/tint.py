"""The TinT as an nn.Module: an input layer, a list of calls of shared primitives, an output head.

    forward(input_ids [B, T], train_mask [B, T], prefixes) -> (logits [B, T, V], new prefixes)

`prefixes` is what `encode(aux_state_dict)` returns; the module's own weights were
constructed from shapes and settings alone, so one TinT serves every checkpoint of
its architecture.
"""

from __future__ import annotations

import torch
from torch import nn

from . import prefixes as prefix_blocks
from .lower import TOKENS, Program, Read


class TinT(nn.Module):
    def __init__(self, program: Program):
        super().__init__()
        self.program = program
        self.layers = nn.ModuleDict(program.layers)

    # -- θ <-> prefixes --------------------------------------------------------------------
    def encode(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return prefix_blocks.encode(self.program.layout, state_dict)

    def decode(self, prefixes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return prefix_blocks.decode(self.program.layout, prefixes)

    # -- the forward pass ------------------------------------------------------------------
    def forward(self, input_ids, train_mask, prefixes, label_mask=None):
        p = self.program
        batch, length = input_ids.shape
        if length > p.max_length:
            raise ValueError(f"input length {length} exceeds the TinT's max_length {p.max_length}")
        # every input may hold one checkpoint for all sequences or one per sequence: [B, ...]
        batched = {name: t if t.dim() == 3 else t.expand(batch, -1, -1) for name, t in prefixes.items()}
        vocab = batched["vocab"]
        unembed = batched.get("unembed", vocab)
        h = self._input_layer(input_ids, train_mask, label_mask, batched["positions"], vocab, unembed)
        streams = {TOKENS: h, "unembed": unembed}
        for block in p.layout.blocks:
            streams[f"{block}@0"] = batched[block]
        for call in p.calls:
            delta = self.layers[call.layer](*(self._gather(streams, r) for r in call.reads))
            if call.base is not None:  # a descent writes the block's next version
                streams[call.write.stream] = streams[call.base].clone()
            field = call.write.fields[0]
            streams[call.write.stream][..., field.start : field.stop] += delta
        logits = h[..., p.logits.start : p.logits.stop] @ unembed.transpose(-1, -2)
        new_prefixes = {name: prefixes[name] for name in ("vocab", "positions", "unembed") if name in prefixes}
        new_prefixes.update({block: streams[stream] for block, stream in p.final_blocks.items()})
        return logits, new_prefixes

    def _input_layer(self, input_ids, train_mask, label_mask, positions, vocab, unembed):
        """The TinT's embedding: token and position rows of the aux tables, a constant one,
        one-hot positions, and the train and label masks, each in its field."""
        p = self.program
        batch, length = input_ids.shape
        f = p.inputs
        h = torch.zeros(batch, length, p.width, dtype=vocab.dtype)
        offset = p.layout.position_offset
        rows = torch.arange(batch)[:, None]
        h[..., _slice(f["token_embed"])] = vocab[rows, input_ids]
        h[..., _slice(f["pos_embed"])] = positions[:, offset : offset + length]
        if "target_embed" in f:
            h[..., _slice(f["target_embed"])] = unembed[rows, input_ids]
        h[..., f["one"].start] = 1.0
        h[..., f["positions"].start : f["positions"].start + length] = torch.eye(length, dtype=h.dtype)
        h[..., f["train"].start] = train_mask.to(h.dtype)
        h[..., f["label"].start] = 1.0 if label_mask is None else label_mask.to(h.dtype)
        return h

    @staticmethod
    def _gather(streams, read: Read):
        t = streams[read.stream]
        if not read.fields:
            return t
        parts = [t[..., f.start : f.stop] for f in read.fields]
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


def _slice(field) -> slice:
    return slice(field.start, field.stop)
