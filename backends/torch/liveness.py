"""When each token-stream coordinate is accessed: the one liveness analysis of a TinT's program.

Walking the calls in order, `Accesses` keeps for every coordinate the first and the last call that
wrote it and the last call that read it (−1: the input layer; −2: none yet). Register allocation
(allocate.py, through program.lives), the standard view's erasures (standard_plan.py), the
reference convention's working set (tintc/report/dense_count.py) and the program's lint
(program.lint) all read it. Calls in tint_config.json's form give their token fields with
`json_token_fields`; the typed program's calls with Call.token_fields.

Carried inside the emitted package (the package's standard view places its erasures with it), so
it imports only torch and the runtime.
"""

import torch

TOKEN_STREAM = "tokens"
NEVER = -2  # no access yet
INPUT_LAYER = -1  # the input layer writes before call 0


def json_token_fields(call: dict) -> tuple[list, list]:
    """(fields read, fields written) of the token stream by a call in tint_config.json's form."""
    read = [f for fields, stream in zip(call["reads"], call["streams"]) if stream == TOKEN_STREAM
            for group in fields for f in group]
    return read, list(call["write"]) if call["target"] == TOKEN_STREAM else []


class Accesses:
    """Per coordinate of a stream `width` wide: first_write, last_write, last_read (call indices).
    Accesses are recorded by field, as slices (fields are few runs, coordinates many)."""

    def __init__(self, width: int, inputs):
        self.first_write = torch.full((width,), NEVER, dtype=torch.long)
        self.last_write = torch.full((width,), NEVER, dtype=torch.long)
        self.last_read = torch.full((width,), NEVER, dtype=torch.long)
        self.write(INPUT_LAYER, inputs)

    def read(self, call: int, fields) -> None:
        """Record a read of (start, width) fields."""
        for start, width in fields:
            self.last_read[start : start + width] = call

    def read_coordinates(self, call: int, idx: torch.Tensor) -> None:
        """Record a read of these coordinates."""
        self.last_read[idx] = call

    def write(self, call: int, fields) -> None:
        for start, width in fields:
            first = self.first_write[start : start + width]
            first.masked_fill_(first == NEVER, call)
            self.last_write[start : start + width] = call

    def written(self, idx: torch.Tensor) -> torch.Tensor:
        """Whether each coordinate has held a value (the input layer's count)."""
        return self.last_write[idx] != NEVER

    def last_access(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.maximum(self.last_write[idx], self.last_read[idx])

    def last_was_read(self, idx: torch.Tensor) -> torch.Tensor:
        """Whether the last access was a read (a call that reads and writes a coordinate writes last)."""
        return self.last_read[idx] > self.last_write[idx]

    def unread_write(self, idx: torch.Tensor) -> torch.Tensor:
        """Whether the last access was a write by a call that did not also read the coordinate."""
        return self.last_write[idx] > self.last_read[idx]
