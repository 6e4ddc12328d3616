"""The TinT runtime: everything a compiled TinT runs besides its list of calls, in plain torch.

The in-memory module (backends/torch/tint.py) imports it, and the emitted package carries the
source of every module in CARRIED, in that order, inside tint_model.py (backends/torch/emit.py),
so both run the same code. Those modules import nothing but torch, the standard library and each
other (the emitter drops their imports of each other; their top-level names must be distinct):

    ir/activations.py   the activation table
    checks.py           what a TinT is given, checked at the boundary
    projection.py       a projection in any stored form (dense, diagonal, selection, factored)
    primitives.py       the layer primitives
    calls.py            one call: gather the groups' inputs, run the primitive, write the output
    stream_io.py        the input layer and the output head
    prefix_codec.py     aux weights <-> prefix tokens
"""

from ir import activations

from . import calls, checks, prefix_codec, primitives, projection, stream_io
from .calls import apply, coordinates, runs_of, wiring  # noqa: F401
from .checks import FINGERPRINT, contract  # noqa: F401
from .prefix_codec import decode, encode  # noqa: F401
from .primitives import MLP, PRIMITIVES, WEIGHTS, Attention, Gate, Linear, Norm, projections  # noqa: F401
from .projection import STRUCTURED, Dense, Diagonal, DiagonalBlocks, LowRank, Selection, as_projection  # noqa: F401
from .stream_io import begin, block_stream, finish, release_beyond  # noqa: F401

CARRIED = (activations, checks, projection, primitives, calls, stream_io, prefix_codec)
