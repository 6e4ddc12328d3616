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
from .lower import TOKENS, Program


def _index(groups) -> torch.Tensor:
    """[G, width]: the stream coordinates each group reads or writes."""
    return torch.tensor([[i for f in fields for i in range(f.start, f.stop)] for fields in groups])


class TinT(nn.Module):
    def __init__(self, program: Program):
        super().__init__()
        self.program = program
        self.layers = nn.ModuleDict(program.layers)
        # the wiring: which coordinates each call gathers and writes (not weights: fixed by the lowering)
        self._reads = [[None if not r.groups else _index(r.groups) for r in c.reads] for c in program.calls]
        self._writes = [_index([(f,) for f in c.write.groups]).flatten() for c in program.calls]

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
        for call, reads, write in zip(p.calls, self._reads, self._writes):
            inputs = [streams[r.stream].unsqueeze(2) if index is None else streams[r.stream][..., index]
                      for r, index in zip(call.reads, reads)]  # each [B, T, G, width]
            delta = self.layers[call.layer](*inputs)
            if call.write.base is not None:  # a descent adds to a copy: the block's next version
                streams[call.write.stream] = streams[call.write.base].clone()
            else:  # a gated residual write: the field's old content is gated out first
                streams[call.write.stream][..., write] = 0.0
            streams[call.write.stream].index_add_(-1, write, delta.flatten(-2))
        logits = h[..., p.logits.start : p.logits.stop] @ unembed.transpose(-1, -2)
        new_prefixes = {name: prefixes[name] for name in ("vocab", "positions", "unembed") if name in prefixes}
        new_prefixes.update({block: streams[stream] for block, stream in p.final_blocks.items()})
        return logits, new_prefixes

    def _input_layer(self, input_ids, train_mask, label_mask, positions, vocab, unembed):
        """The TinT's embedding: token and position rows of the aux tables, constants one and
        zero, one-hot positions, and the train and label masks, each in its field."""
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


def _slice(field) -> slice:
    return slice(field.start, field.stop)
