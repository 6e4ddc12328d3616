"""The elementwise activations, by name: one table for the backward rules (ir/rules.py), the fast
executor's MLP primitive and the standard view's gated MLP blocks (backends/torch).

Carried verbatim inside the emitted package (backends/torch/emit.py), so it imports only torch.
tanh-GELU is written out op by op (GPT-2's gelu_new), not as F.gelu(approximate="tanh"): the two
round differently, and this is the form the executor and the rules have always used.
"""

import math

import torch
import torch.nn.functional as F


def gelu_tanh(x):
    """GPT-2's gelu_new: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def gelu_bloom(x):
    """BLOOM's tanh GELU, its constant and op order: x·0.5·(1 + tanh(0.79788456·x·(1 + 0.044715·x·x)))
    (0.79788456 is √(2/π) to 8 digits: it differs from gelu_tanh by ~1e-9 relative)."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def identity(x):
    return x


# the aux models' activations (ir/ops.py's activation op) and the TinT's own units (identity: a
# bilinear gated unit, tanh, sigmoid)
ACTIVATIONS = {"identity": identity, "gelu_tanh": gelu_tanh, "gelu_bloom": gelu_bloom, "gelu": F.gelu, "relu": F.relu, "silu": F.silu,
               "tanh": torch.tanh, "sigmoid": torch.sigmoid}
