"""tintc: compile an auxiliary transformer into a TinT (Transformer in Transformer)."""

__version__ = "0.1.0"
