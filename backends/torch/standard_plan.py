"""The standard view's plan: each call of the fast executor as one transformer block, described by
small matrices over runs of stream coordinates (no D_sim-wide tensor), with the erasures that gated
writes need. backends/torch/standard.py builds the blocks from it; tintc/report/dense_count.py counts
it. Carried inside the emitted package (backends/torch/emit.py), so it imports only torch and the
runtime. See standard.py for the view itself.
"""

from dataclasses import dataclass, field

import torch

from ir.activations import ACTIVATIONS
from .calls import coordinate_tensor, coordinates, runs_of
from .liveness import Accesses, json_token_fields
from .primitives import MLP, Attention, Linear, Norm
from .projection import as_projection
from .stream_io import stream_block

NULL, VOCAB, TOKENS = "null", "vocab", "tokens"


# -- the plan: blocks as small matrices over coordinate runs (no D_sim-wide tensor) ----------------
# A coordinate set is a tuple of (start, size) runs of the stream; a projection part is
# (matrix [n, width], runs) with width = the runs' total size, or (None, runs): the identity.
def run_width(runs) -> int:
    return sum(size for _, size in runs)


@dataclass
class Head:
    q: tuple  # (matrix [dq, n], runs): the query reads these coordinates; matrix None: the identity
    k: tuple
    v: tuple  # matrix "negate": −identity (an erase head)
    o: tuple  # (matrix [out, dv] or None, per written field: runs)

    def size(self, part: str) -> int:
        """The head's dimension on projection `part` (q, k, v; o: v's)."""
        matrix, runs = getattr(self, "v" if part == "o" else part)
        return run_width(runs) if matrix is None or isinstance(matrix, str) else matrix.shape[0]


@dataclass
class Units:
    """n units σ(a·h) ⊙ (b·h); a or b None means the constant-one coordinate (1 at every token)."""
    n: int
    a: tuple | None
    b: tuple | None
    o: tuple  # (matrix [out, n] or None for the identity, scale, per written field: runs)

    @property
    def erases(self) -> bool:
        """Erase units (erase_units): −h_c on the constant branch, b the string-tagged ("negate", runs)."""
        return self.b is not None and isinstance(self.b[0], str)


@dataclass
class BlockPlan:
    kind: str  # attention | mlp | norm
    node: str  # the training-graph op (or "erase")
    phase: str
    heads: list = field(default_factory=list)  # attention: Head; norm: (runs read, [runs written])
    units: list = field(default_factory=list)  # mlp: Units
    act: str = "identity"
    softmax: bool = False
    mask: tuple = ()  # (query kind, key kind, causal)
    eps: float = 0.0

    def fold_erasures(self, coords: set[int], one: int) -> set[int]:
        """Add −h_c for each coordinate that a unit already writes alone, without more units: on the
        constant branch (a linear map's, a Gate's linear term) −h_c joins its input; in a product of a
        bilinear block whose one side reads h_c alone, the other side takes a constant. Returns the
        coordinates left."""
        left = set(coords)
        for i, u in enumerate(self.units):
            if not left or u.o[0] is not None or len(u.o[2]) != 1 or u.b is None or u.erases:
                continue
            if u.a is None:
                self.units[i], left = _fold_erasure(u, left, self.sigma_one)
            elif self.act == "identity":
                self.units[i], left = _fold_into_product(u, left, one)
        return left

    def erase_units(self, coords: set[int]) -> None:
        """Add −h_c for each coordinate by units of their own: linear units on the constant branch σ(1)."""
        runs = runs_of(sorted(coords))
        self.units.append(Units(len(coords), None, ("negate", runs), (None, 1.0 / self.sigma_one, [runs])))

    @property
    def sigma_one(self) -> float:
        return float(ACTIVATIONS[self.act](torch.tensor(1.0, dtype=torch.float64)))

    @property
    def width(self) -> int:
        """Heads (attention), units (MLP) or normalised coordinates (norm)."""
        if self.kind == "attention":
            return len(self.heads)
        if self.kind == "mlp":
            return sum(u.n for u in self.units)
        return sum(run_width(runs) for runs, _ in self.heads)

    def column_runs(self, one: int) -> dict[str, list]:
        """Per projection, the runs of stream coordinates it reads (Q, K, V, W_a, W_b, W_in) or writes
        (O, W_o), one tuple of runs per head, unit group or norm group."""
        if self.kind == "attention":
            return {"q": [h.q[1] for h in self.heads], "k": [h.k[1] for h in self.heads],
                    "v": [h.v[1] for h in self.heads], "o": [r for h in self.heads for r in h.o[1]]}
        if self.kind == "mlp":
            return {"a": [u.a[1] if u.a else ((one, 1),) for u in self.units],
                    "b": [u.b[1] if u.b else ((one, 1),) for u in self.units],
                    "o": [r for u in self.units for r in u.o[2]]}
        return {"in": [runs for runs, _ in self.heads], "o": [r for _, w in self.heads for r in w]}

    def columns(self, one: int) -> dict[str, list[int]]:
        """Per projection, the stream coordinates it reads or writes (column_runs), sorted."""
        return {name: sorted({c for runs in runs_lists for c in coordinates(runs)})
                for name, runs_lists in self.column_runs(one).items()}

    def group_sizes(self) -> dict[str, list[int]]:
        """Per projection that reads, the size of each head, unit group or norm group on the block's side,
        in column_runs' order."""
        if self.kind == "attention":
            return {part: [h.size(part) for h in self.heads] for part in ("q", "k", "v")}
        if self.kind == "mlp":
            return {name: [u.n for u in self.units] for name in ("a", "b")}
        return {"in": [run_width(runs) for runs, _ in self.heads]}

    def rows(self) -> dict[str, int]:
        """Per projection, its size on the block's side: query, key, value dims of all heads, units,
        normalised coordinates (the output's: the value's, or the block's width)."""
        sizes = {name: sum(n) for name, n in self.group_sizes().items()}
        return {**sizes, "o": sizes["v"] if self.kind == "attention" else self.width}

    def dense_parameters(self, d_sim: int, one: int, factored: bool = False) -> int:
        """Parameters of the block's projections as dense matrices over the stream; `factored`: each
        projection that touches k coordinates stored as [n, k]·[k, D_sim] where that is smaller."""
        if not factored:
            return sum(n * d_sim for n in self.rows().values())
        runs = self.column_runs(one)
        return sum(factored_size(n, covered_width(runs[name]), d_sim) for name, n in self.rows().items())


def _fold_erasure(u: Units, coords: set, sigma_one: float) -> tuple[Units, set]:
    """Units u (constant branch, identity output: unit r adds scale·σ(1)·(b_r·h) to the r-th coordinate it
    writes) with −h_c added to the unit writing each c of `coords` it writes; and the coordinates left."""
    written = coordinates(u.o[2][0])
    rows = {c: r for r, c in enumerate(written) if c in coords}
    if not rows:
        return u, coords
    matrix, runs = u.b
    read = coordinates(runs)
    matrix = torch.eye(len(read), dtype=torch.float64) if matrix is None else matrix
    column = {c: j for j, c in reversed(list(enumerate(read)))}
    extra = sorted(c for c in rows if c not in column)
    column.update({c: len(read) + j for j, c in enumerate(extra)})
    matrix = torch.cat([matrix, matrix.new_zeros(matrix.shape[0], len(extra))], 1)  # a copy: the primitive's is shared
    for c, r in rows.items():
        matrix[r, column[c]] -= 1.0 / (u.o[1] * sigma_one)
    return Units(u.n, None, (matrix, runs + runs_of(extra)), u.o), coords - set(rows)


def _fold_into_product(u: Units, coords: set, one: int) -> tuple[Units, set]:
    """Gate units u (σ the identity, identity output: unit r adds scale·(a_r·h)(b_r·h) to the r-th
    coordinate it writes) where one side of unit r reads h_c alone, β·h_c, for the c it writes: the other
    side gets −1/(scale·β) on the constant one, so the unit adds scale·(a_r·h)(b_r·h) − h_c at tokens
    (one = 1) and what it added before at prefix positions (one = 0). Returns the units and the
    coordinates left."""
    written = coordinates(u.o[2][0])
    rows = {c: r for r, c in enumerate(written) if c in coords}
    shift: dict[int, list] = {0: [], 1: []}  # side to shift -> (row, β)
    for side, (matrix, runs) in enumerate((u.a, u.b)):
        read = coordinates(runs)
        for c, r in list(rows.items()):
            nonzero = matrix[r].nonzero().flatten()
            if len(nonzero) == 1 and read[int(nonzero[0])] == c:
                shift[1 - side].append((r, float(matrix[r, nonzero[0]])))
                del rows[c]
    sides = [u.a, u.b]
    for side, entries in shift.items():
        if entries:
            matrix, runs = sides[side]
            matrix = torch.cat([matrix, matrix.new_zeros(matrix.shape[0], 1)], 1)  # a copy: the primitive's is shared
            for r, beta in entries:
                matrix[r, -1] -= 1.0 / (u.o[1] * beta)
            sides[side] = (matrix, runs + ((one, 1),))
    folded = {written[r] for side in shift.values() for r, _ in side}
    return Units(u.n, sides[0], sides[1], u.o), coords - folded


def factored_size(n: int, k: int, d_sim: int) -> int:
    return min(n * d_sim, k * (n + d_sim))


def covered_width(runs_lists) -> int:
    """How many coordinates the union of these runs covers (without listing them)."""
    total, end = 0, 0
    for start, size in sorted(r for runs in runs_lists for r in runs):
        if start + size > end:
            total += start + size - max(start, end)
            end = start + size
    return total


@dataclass
class StreamPlan:
    width: int  # W: the token fields
    rows: int  # the widest block or vocabulary row
    blocks: list[BlockPlan]
    one: int  # the constant-one coordinate
    rows_at: int | None = None  # the first row coordinate: W (None), or lower where rows share token coordinates

    @property
    def row_start(self) -> int:
        return self.width if self.rows_at is None else self.rows_at

    @property
    def d_sim(self) -> int:
        return max(self.width, self.row_start + self.rows)


def plan(config: dict, layers) -> StreamPlan:
    """The standard view of a TinT: config in tint_config.json's form, layers its primitives by name."""
    width, rows_at = config["width"], config.get("rows_at")
    row_start = width if rows_at is None else rows_at
    d = config["inputs"]["token_embed"][1]
    rows = max([d] + [b["width"] for b in config["layout"]["blocks"].values()])
    version = {name: 0 for name in config["layout"]["blocks"]}

    def kind(stream: str) -> str:
        return TOKENS if stream == TOKENS else VOCAB if stream == "unembed" else stream_block(stream)[0]

    def runs(stream: str, fields, read=True) -> tuple:
        if read and kind(stream) in version and stream_block(stream)[1] != version[kind(stream)]:
            raise ValueError(f"{stream} is read after its block's next version was written; the standard view "
                             "keeps one version of a block per position")
        if stream == "unembed" and not fields:
            return ((row_start, d),)
        offset = 0 if stream == TOKENS else row_start
        return tuple((offset + start, size) for start, size in fields)

    out, dense = [], _shared_dense()
    for call in config["calls"]:
        streams, target = call["streams"], call["target"]
        reads = [[runs(s, g) for g in r] or [runs(s, [])] * len(call["write"]) for s, r in zip(streams, call["reads"])]
        unique: dict[tuple, list] = {}  # groups that read the same coordinates compute once
        for group, written in zip(zip(*reads), call["write"]):
            unique.setdefault(group, []).append(runs(target, [written], read=False))
        out.append(_block(layers[call["layer"]], call, kind(streams[-1]), kind(target), unique, dense))
        if kind(target) in version:
            version[kind(target)] += 1
    return _place_erasures(StreamPlan(width, rows, out, config["inputs"]["one"][0], rows_at), config)


def _shared_dense():
    """A projection's dense matrix, once per projection: calls of one primitive share its dense matrices (each call anew
    took 4 GB and 11 s on SmolLM2-135M, whose 2,434 calls share 30 primitives)."""
    cache = {}

    def dense(w):
        if id(w) not in cache:
            cache[id(w)] = (w, as_projection(w).dense())  # w held, so that its id is not reused
        return cache[id(w)][1]
    return dense


def _block(layer, call, key_kind: str, query_kind: str, unique: dict, dense) -> BlockPlan:
    node, phase = call["node"], call["phase"]
    if isinstance(layer, Attention):
        wq, wk, wv, wo = (dense(w) for w in (layer.w_q, layer.w_k, layer.w_v, layer.w_o))
        n = layer.heads  # heads per group: each reads its rows of W_q, W_k, W_v and writes through its columns of W_o
        dq, dk, dv = (w.shape[0] // n for w in (wq, wk, wv))
        heads = [Head((wq[h * dq:(h + 1) * dq], q), (wk[h * dk:(h + 1) * dk], k), (wv[h * dv:(h + 1) * dv], v),
                      (wo[:, h * dv:(h + 1) * dv], written)) for (q, k, v), written in unique.items() for h in range(n)]
        return BlockPlan("attention", node, phase, heads=heads, softmax=layer.softmax,
                         mask=(query_kind, key_kind, layer.mask == "causal"))
    if isinstance(layer, Norm):
        return BlockPlan("norm", node, phase, heads=[(g[0], w) for g, w in unique.items()], eps=layer.eps)
    block = BlockPlan("mlp", node, phase, act=layer.fn if isinstance(layer, MLP) else "identity")
    for group, written in unique.items():
        if isinstance(layer, Linear):
            w = dense(layer.weight)
            block.units.append(Units(w.shape[0], None, (w, group[0]), (None, 1.0, written)))
        elif isinstance(layer, MLP):
            w_in = dense(layer.w_in)
            block.units.append(Units(w_in.shape[0], (w_in, group[0]), None, (dense(layer.w_out), 1.0, written)))
        else:  # Gate: (a·x_a) ⊙ (b·x_b) + c·x_c
            a = dense(layer.a)
            block.units.append(Units(a.shape[0], (a, group[0]), (dense(layer.b), group[1]), (None, 1.0, written)))
            if layer.c is not None:
                c = dense(layer.c)
                block.units.append(Units(c.shape[0], None, (c, group[2]), (None, 1.0, written)))
    return block


def vanishes_at_zero(act: str) -> bool:
    """σ(0) = 0: erase units σ(one)·(−h) then leave prefix positions (one = 0 there) untouched."""
    return float(ACTIVATIONS[act](torch.zeros((), dtype=torch.float64))) == 0.0


def _place_erasures(stream: StreamPlan, config: dict) -> StreamPlan:
    """Each gated write over coordinates that may hold a dead value gets −h_c (a coordinate may hold one
    once written; the input layer writes the inputs):
    - in the writing MLP, where a unit that writes c can take it (free: BlockPlan.fold_erasures);
    - else, where the dead value's last access comes before the write, in an erase head: an attention
      block inserted between the two whose one linear head attends each token to itself through the
      one-hot positions (query and key: the positions; 1 on the diagonal, 0 elsewhere) and adds −h_c,
      two rows per coordinate. One block serves every write whose range it lies in (the fewest blocks:
      each is placed before the earliest pending write);
    - else (the writer reads the dead value itself: only an MLP may) in erase units of the writer,
      σ(one)·(−h_c), three rows per coordinate. Where rows share token coordinates, allocate.unshareable
      keeps such an MLP's writes apart when σ(0) ≠ 0."""
    accesses = Accesses(config["width"], config["inputs"].values())
    blocks = stream.blocks
    pending: list[tuple[int, int, list[int]]] = []  # (first block it may precede, the writer, coordinates)
    for i, (block, call) in enumerate(zip(blocks, config["calls"])):
        read_fields, written_fields = json_token_fields(call)
        accesses.read(i, {tuple(f) for f in read_fields})
        written = coordinate_tensor(written_fields)
        if call["gated"] and len(written):
            dirty = written[accesses.written(written)]
            if block.kind == "mlp":
                dirty = torch.tensor(sorted(block.fold_erasures(set(dirty.tolist()), stream.one)), dtype=torch.long)
            after = accesses.last_access(dirty) + 1  # an erase block may precede blocks after..i
            in_place = after > i
            if in_place.any():
                if block.kind != "mlp":
                    raise ValueError(f"call {call['node']} ({block.kind}) writes over a value it reads; only "
                                     "an MLP block can erase it in the same block")
                block.erase_units(set(dirty[in_place].tolist()))
            for start in torch.unique(after[~in_place]).tolist():
                pending.append((start, i, dirty[after == start].tolist()))
        accesses.write(i, {tuple(f) for f in written_fields})
    positions = (tuple(config["inputs"]["positions"]),)
    inserted: dict[int, list[int]] = {}  # block index -> the coordinates its erase block clears
    at = -1
    for start, writer, coords in sorted(pending, key=lambda p: p[1]):
        if start > at:
            at = writer
        inserted.setdefault(at, []).extend(coords)
    erase = {i: BlockPlan("attention", "erase", blocks[i].phase, heads=[_erase_head(coords, positions)],
                          mask=(TOKENS, TOKENS, True)) for i, coords in inserted.items()}
    stream.blocks = [b for i, block in enumerate(blocks) for b in ([erase[i]] if i in erase else []) + [block]]
    return stream


def _erase_head(coords: list[int], positions: tuple) -> Head:
    """A linear head that scores each token against itself only (one-hot positions) and adds −h_c."""
    runs = runs_of(sorted(coords))
    return Head((None, positions), (None, positions), ("negate", runs), (None, [runs]))
