"""Code generators: lower the IR to a runnable TinT."""
