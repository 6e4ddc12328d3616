"""Recognition of fused projections (a part of recognize.py's Recognizer): one linear whose output is
cut into q|k|v or gate|up. GPT-2 splits it, GPT-NeoX chunks each head's [q|k|v], Phi-3 slices it, BLOOM
views it as [heads, 3, head_dim] and selects; each part becomes a linear of a row range of the fused
weight (every `period` rows when the parts interleave per head), its role its place in the adapter's
tuple of roles."""

from __future__ import annotations

from dataclasses import replace

from ..graph import WeightRef
from .values import Const, Fused, Ids, Val, op_name


class FusedProjections:
    def op_split(self, node, fused, size, dim=0):
        return self._parts(node, fused, size, dim)

    def op_chunk(self, node, fused, chunks, dim=0):
        return self._parts(node, fused, node.args[0].meta["val"].shape[-1] // chunks, dim)

    def _parts(self, node, fused, size: int, dim: int) -> list:
        """The parts of a fused projection cut on its last axis. When views have cut that axis into
        groups (GPT-NeoX: heads × [q|k|v]), a part takes its rows from every group: a period."""
        value = self.values[fused]
        if not isinstance(value, Fused) or dim not in (-1, node.args[0].meta["val"].dim() - 1):
            self.fail(node, "only a fused projection may be split, on its last axis")
        total = value.weight.shape(self.params[value.weight.name].shape)[0]
        period = int(node.args[0].meta["val"].shape[-1])
        if total % period:
            self.fail(node, f"the split axis ({period}) does not divide the projection's {total} outputs")
        return [replace(value, rows=(s, min(s + size, period)), period=period if period < total else None)
                for s in range(0, period, size)]

    def op_select(self, node, fused, dim, index):
        """BLOOM's q|k|v: the fused output viewed as [.., heads, 3, head_dim], part `index` of every head."""
        value, shape = self.values[fused], node.args[0].meta["val"].shape
        if isinstance(value, (Const, Ids)):
            return Const()
        if not isinstance(value, Fused) or dim not in (-2, len(shape) - 2):
            self.fail(node, "only a fused projection viewed as [.., heads, parts, width] may be selected from")
        width, period = int(shape[-1]), int(shape[-2] * shape[-1])
        total = value.weight.shape(self.params[value.weight.name].shape)[0]
        rows = (index * width, (index + 1) * width)
        return self._part(node, replace(value, rows=rows, period=period if period < total else None), index)

    def op_getitem(self, node, parts, index):
        part = self.values[parts][index] if isinstance(self.values[parts], list) else None
        if isinstance(part, Fused):
            return self._part(node, part, index)
        return Const()  # an element of a constant tuple (rotary cos, sin)

    def _part(self, node, part: Fused, index: int) -> Val:
        """The linear of one part (rows) of a fused projection; `index`: its place in the adapter's roles."""
        rows = part.rows
        weight = WeightRef(part.weight.name, part.weight.transpose, rows, period=part.period)
        weights = {"weight": weight}
        if part.bias is not None:
            weights["bias"] = WeightRef(part.bias.name, rows=rows, period=part.period)
        role = self.role(node, part.module, index)
        out = weight.shape(self.params[weight.name].shape)[0]
        return self.emit(role, "linear", [part.x], out, part.module, role, weights)

    def _sliced_part(self, node, fused: Fused, dim: int, start: int, stop: int, step: int) -> Val:
        """A part of a fused projection cut by a slice of its output's last axis (Phi-3's q|k|v).
        Its role is its place among the slices of that output, ordered by where they start."""
        if dim not in (-1, node.args[0].meta["val"].dim() - 1) or step != 1:
            self.fail(node, "a fused projection may be sliced only on its last axis, in consecutive rows")
        total = fused.weight.shape(self.params[fused.weight.name].shape)[0]
        slices = [u for u in node.args[0].users if op_name(u) == "slice"]
        starts = sorted({(u.args[2] if len(u.args) > 2 else None) or 0 for u in slices})  # slice(x, dim, start..)
        return self._part(node, replace(fused, rows=(start, min(stop, total))), starts.index(start))
