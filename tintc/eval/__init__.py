"""`tintc eval`: the paper's experiment on text (perplexity) and in-context classification."""
