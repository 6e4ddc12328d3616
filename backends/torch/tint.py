"""The TinT as an nn.Module: an input layer, a list of calls of shared primitives, an output head.

    forward(input_ids [B, T], train_mask [B, T], prefixes, lr=None) -> (logits [B, T, V], new prefixes)

`prefixes` is what `encode(aux_state_dict)` returns; the module's own weights were
constructed from shapes and settings alone, so one TinT serves every checkpoint of
its architecture, and every learning rate η (an input, like the train mask). The computation itself is in backends/torch/runtime.py, which the
emitted package carries too.
"""

from __future__ import annotations

from torch import nn

from . import runtime
from .program import TOKENS, Program, call_json, program_json
from .prefixes import layout_json


class TinT(nn.Module):
    def __init__(self, program: Program, label_only: bool = False):
        super().__init__()
        self.program, self.label_only = program, label_only
        self.layers = nn.ModuleDict(program.layers)
        self.layout = layout_json(program.layout)
        self.fields = {name: [f.start, f.width] for name, f in program.inputs.items()}
        self.contract = runtime.contract(self.layout, program.max_length, label_only)  # what forward accepts
        # the wiring: which coordinates each call gathers and writes (fixed by the lowering)
        self._wiring = [runtime.wiring(call_json(c)) for c in program.calls]

    def standard(self, dtype=None, factored: bool | None = None):
        """The standard view of this TinT (backends/torch/standard.py): the same function as a plain
        stack of transformer blocks over one residual stream (factored: see standard_view)."""
        from .standard import standard_view

        config = {**program_json(self.program), "label_only": self.label_only}
        return standard_view(config, self.layers, dtype or self.dtype, factored)

    @property
    def dtype(self):
        """The dtype of its weights: the prefixes and the stream have it too."""
        return next(self.parameters()).dtype

    def encode(self, state_dict):
        """θ (Hugging Face names) -> prefixes in this TinT's dtype."""
        return runtime.encode(self.layout, state_dict, self.dtype)

    def decode(self, prefixes):
        return runtime.decode(self.layout, prefixes)

    def forward(self, input_ids, train_mask, prefixes, label_mask=None, lr=None):
        """lr: η for the SGD steps (a number, or [B]: one per sequence); None: the config's."""
        streams = self.begin(input_ids, train_mask, prefixes, label_mask, lr)
        self.run(streams, 0, len(self.program.calls))
        return self.finish(streams, prefixes)

    # forward in three parts, so that a pipeline stage (tintc/eval/stages.py) runs a range of calls
    def begin(self, input_ids, train_mask, prefixes, label_mask=None, lr=None) -> dict:
        """The input layer: the streams by name (tokens, unembed, each prefix block at version 0)."""
        p = self.program
        h, unembed, blocks = runtime.begin(self.fields, p.width, p.max_length, p.layout.position_offset,
                                           p.layout.blocks, input_ids, train_mask, label_mask, prefixes,
                                           self.contract, p.lr if lr is None else lr, self.dtype)
        return {TOKENS: h, "unembed": unembed, **blocks}

    def run(self, streams: dict, start: int, stop: int) -> None:
        """Calls [start, stop) on `streams`, in place (each call replaces the stream it writes; the token
        stream's tail and the block versions never read again are let go where the program says)."""
        p = self.program
        for i, call, (reads, write) in zip(range(start, stop), p.calls[start:stop], self._wiring[start:stop]):
            if i in p.narrowing:
                runtime.release_beyond(streams[TOKENS], p.narrowing[i])
            base = call.write.base
            into = streams[call.write.stream] if base is None else streams[base].clone()
            streams[call.write.stream] = runtime.apply(self.layers[call.layer], reads, write,
                                                       [streams[r.stream] for r in call.reads], into, base is None)
            for name in p.released.get(i, ()):  # a block version no later call reads
                del streams[name]

    def finish(self, streams: dict, prefixes):
        """The output head and the new prefixes, from the streams after the last call."""
        p = self.program
        return runtime.finish(streams[TOKENS], [p.logits.start, p.logits.width], streams["unembed"], prefixes,
                              {block: streams[stream] for block, stream in p.final_blocks.items()}, p.logit_softcap)
