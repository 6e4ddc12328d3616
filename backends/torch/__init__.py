"""The PyTorch backend: lower a training graph to TinT layers with constructed weights."""
