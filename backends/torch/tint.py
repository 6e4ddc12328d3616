"""The TinT as an nn.Module: an input layer, a list of calls of shared primitives, an output head.

    forward(input_ids [B, T], train_mask [B, T], prefixes) -> (logits [B, T, V], new prefixes)

`prefixes` is what `encode(aux_state_dict)` returns; the module's own weights were
constructed from shapes and settings alone, so one TinT serves every checkpoint of
its architecture. The computation itself is in backends/torch/runtime.py, which the
emitted package carries too.
"""

from __future__ import annotations

from torch import nn

from . import runtime
from .program import TOKENS, Program, call_json
from .prefixes import layout_json


class TinT(nn.Module):
    def __init__(self, program: Program):
        super().__init__()
        self.program = program
        self.layers = nn.ModuleDict(program.layers)
        self.layout = layout_json(program.layout)
        self.fields = {name: [f.start, f.width] for name, f in program.inputs.items()}
        # the wiring: which coordinates each call gathers and writes (fixed by the lowering)
        self._wiring = [runtime.wiring(call_json(c)) for c in program.calls]

    def encode(self, state_dict):
        return runtime.encode(self.layout, state_dict)

    def decode(self, prefixes):
        return runtime.decode(self.layout, prefixes)

    def forward(self, input_ids, train_mask, prefixes, label_mask=None):
        p = self.program
        batch, length = input_ids.shape
        if length > p.max_length:
            raise ValueError(f"input length {length} exceeds the TinT's max_length {p.max_length}")
        # every input may hold one checkpoint for all sequences or one per sequence: [B, ...]
        batched = {name: t if t.dim() == 3 else t.expand(batch, -1, -1) for name, t in prefixes.items()}
        unembed = batched.get("unembed", batched["vocab"])
        h = runtime.input_layer(self.fields, p.width, p.layout.position_offset, input_ids, train_mask, label_mask,
                                batched["positions"], batched["vocab"], unembed)  # [B, T, width]
        streams = {TOKENS: h, "unembed": unembed}
        for block in p.layout.blocks:
            streams[f"{block}@0"] = batched[block]
        for call, (reads, write) in zip(p.calls, self._wiring):
            base = call.write.base
            into = streams[call.write.stream] if base is None else streams[base].clone()
            streams[call.write.stream] = runtime.apply(self.layers[call.layer], reads, write,
                                                       [streams[r.stream] for r in call.reads], into, base is None)
        logits = h[..., p.logits.start : p.logits.stop] @ unembed.transpose(-1, -2)
        new_prefixes = {name: prefixes[name] for name in ("vocab", "positions", "unembed") if name in prefixes}
        new_prefixes.update({block: streams[stream] for block, stream in p.final_blocks.items()})
        return logits, new_prefixes
