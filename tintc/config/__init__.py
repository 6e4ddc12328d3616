"""The model.yaml file: its schema (schema.py), loading with file:line errors (load.py) and the
checks that need the family's Hugging Face config (cross_checks.py)."""

from tintc.config.load import load_config, parse_config
from tintc.config.schema import ClassifySpec, TintcConfig

__all__ = ["ClassifySpec", "TintcConfig", "load_config", "parse_config"]
