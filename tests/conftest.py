"""Shared test setup: never touch the Hugging Face hub, and keep transformers quiet."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import transformers  # noqa: E402  (after the environment is set)

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# Hypothesis draws new examples on every local run; under CI (CI=true) it replays the same ones,
# so a red CI run can be reproduced with `CI=true pytest ...`.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
