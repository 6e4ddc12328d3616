"""Shared test setup: never touch the Hugging Face hub, and keep transformers quiet."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import transformers  # noqa: E402  (after the environment is set)

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
