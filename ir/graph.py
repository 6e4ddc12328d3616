"""The IR graph: typed op nodes over a networkx DiGraph, plus the aux weights they read.

Nodes are kept in insertion order, which every builder makes a topological order;
`ir.verify` checks that it is one. A graph is treated as a value: passes copy it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import networkx as nx
import torch

Shape = tuple  # entries: int or "T"


@dataclass(frozen=True)
class WeightRef:
    """A matrix or vector read from an aux parameter: param (transposed?) [rows start:stop].

    GPT-2 stores Conv1D weights as [in, out] and fuses q|k|v on the output axis, so its
    query weight is `transformer.h.0.attn.c_attn.weight`, transposed, rows 0:D. With a
    `period`, the rows are start:stop of every block of `period` rows: GPT-NeoX interleaves
    q|k|v per head, so its query weight is rows 0:head_dim of every 3·head_dim. `cols` then selects
    columns start:stop (a chunk of a map's inputs: tint.passes.split_mlp's down projections).
    """

    name: str
    transpose: bool = False
    rows: tuple[int, int] | None = None
    version: int = 0  # θ_0 is the aux weight; θ_{n+1} is written by a descent op of step n
    period: int | None = None  # rows repeat every `period` rows (None: one contiguous range)
    cols: tuple[int, int] | None = None  # columns start:stop of the (transposed, row-selected) matrix

    @property
    def key(self) -> tuple:
        """The weight independent of its version."""
        return (self.name, self.transpose, self.rows, self.period, self.cols)

    def at(self, version: int) -> "WeightRef":
        return WeightRef(self.name, self.transpose, self.rows, version, self.period, self.cols)

    def row_index(self, n: int) -> slice | torch.Tensor:
        """The selected rows of a tensor with n rows: a slice, or an index for periodic rows."""
        start, stop = self.rows if self.rows is not None else (0, n)
        if self.period is None:
            return slice(start, stop)
        return (torch.arange(0, n, self.period)[:, None] + torch.arange(start, stop)).flatten()

    def resolve(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        t = params[self.name]
        if self.transpose:
            t = t.T
        if self.rows is not None:
            t = t[self.row_index(t.shape[0])]
        if self.cols is not None:
            t = t[:, self.cols[0] : self.cols[1]]
        return t

    def shape(self, declared: tuple[int, ...]) -> tuple[int, ...]:
        s = tuple(reversed(declared)) if self.transpose else tuple(declared)
        if self.rows is not None:
            blocks = s[0] // self.period if self.period else 1
            s = ((self.rows[1] - self.rows[0]) * blocks, *s[1:])
        if self.cols is not None:
            s = (s[0], self.cols[1] - self.cols[0])
        return s

    def __str__(self) -> str:
        text = "@" + self.name + (".T" if self.transpose else "")
        if self.rows is not None:
            text += f"[{self.rows[0]}:{self.rows[1]}" + (f"%{self.period}" if self.period else "") + "]"
        if self.cols is not None:
            text += f"[:,{self.cols[0]}:{self.cols[1]}]"
        if self.version:
            text += f"#{self.version}"
        return text


@dataclass
class Node:
    name: str
    kind: str
    inputs: tuple[str, ...]
    shape: Shape
    attrs: dict = field(default_factory=dict)
    weights: dict[str, WeightRef] = field(default_factory=dict)


class Graph:
    """A named graph of ops; `attrs` describe the aux model (family, widths, ...)."""

    def __init__(self, name: str, attrs: dict | None = None):
        self.name = name
        self.attrs: dict = dict(attrs or {})
        self.weight_shapes: dict[str, tuple[int, ...]] = {}  # aux parameter -> declared shape
        self.nx = nx.DiGraph()
        self.producers: dict[tuple, str] = {}  # (weight key, version) -> the descent op writing it

    # -- building -------------------------------------------------------------
    def declare_weight(self, name: str, shape) -> None:
        self.weight_shapes[name] = tuple(int(d) for d in shape)

    def add(self, name: str, kind: str, inputs=(), shape: Shape = (), attrs=None, weights=None) -> str:
        if name in self.nx:
            raise ValueError(f"node name {name!r} is already used")
        for src in inputs:
            if src not in self.nx:  # keeps insertion order topological, so no cycle can form
                raise ValueError(f"node {name!r}: input {src!r} is not defined before it")
        node = Node(name, kind, tuple(inputs), tuple(shape), dict(attrs or {}), dict(weights or {}))
        writers = []
        for ref in node.weights.values():
            if ref.version > 0:  # a weight written by SGD: depend on the op that wrote it
                if (ref.key, ref.version) not in self.producers:
                    raise ValueError(f"node {name!r}: reads {ref} before any descent op writes it")
                writers.append(self.producers[(ref.key, ref.version)])
        self.nx.add_node(name, op=node)
        for slot, src in enumerate(node.inputs):
            self.nx.add_edge(src, name, slot=slot)
        for src in writers:
            self.nx.add_edge(src, name, slot="weight")
        if kind.endswith("_descent"):
            for ref in node.weights.values():
                self.producers[(ref.key, ref.version + 1)] = name
        return name

    # -- reading --------------------------------------------------------------
    def nodes(self) -> list[Node]:
        return [data["op"] for _, data in self.nx.nodes(data=True)]

    def node(self, name: str) -> Node:
        return self.nx.nodes[name]["op"]

    def __contains__(self, name: str) -> bool:
        return name in self.nx

    def __len__(self) -> int:
        return self.nx.number_of_nodes()

    def copy(self) -> "Graph":
        return copy.deepcopy(self)

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, Graph)
            and self.name == other.name
            and self.attrs == other.attrs
            and self.weight_shapes == other.weight_shapes
            and self.nodes() == other.nodes()
        )

    def __repr__(self) -> str:
        return f"<Graph {self.name}: {len(self)} ops, {len(self.weight_shapes)} weights>"
