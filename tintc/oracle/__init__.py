"""The oracles: exact gradient descent and ĝ in plain PyTorch, and the errors between runs."""
