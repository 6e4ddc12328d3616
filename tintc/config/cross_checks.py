"""Cross-field checks on the raw YAML data, so that they run even when the schema fails: trained
kinds vs. the backward rules, and the settings that need the Hugging Face config of the family
(unknown HF keys, model.path's config.json, hidden size vs. heads and prefixes, top-N vs. layers).

Each check returns (location, message) pairs; load.py turns them into `file:line:` lines.
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import re
from pathlib import Path
from typing import Any

from tintc.config.schema import (LAYERS_PATTERN, MAX_LAYERS, MAX_SIZE, MAX_VOCAB, RULE_SETS, ApproximationSpec,
                                 Loc, TintSpec, show)

def cross_checks(data: dict, base: Path) -> list[tuple[Loc, str]]:
    return _rule_checks(data) + _model_checks(data, base)


def _rule_checks(data: dict) -> list[tuple[Loc, str]]:
    """Kinds that get no gradient under the chosen backward rules."""
    tint = data.get("tint") if isinstance(data.get("tint"), dict) else {}
    train = tint.get("train") if isinstance(tint.get("train"), dict) else {}
    approx = tint.get("approximations")
    approx = RULE_SETS.get(approx, {}) if isinstance(approx, str) else approx if isinstance(approx, dict) else {}
    kinds = train.get("kinds", [])
    attention = approx.get("attention", ApproximationSpec.model_fields["attention"].default)
    frozen = [k for k in ("attn_q", "attn_k", "qk_norm_gain") if isinstance(kinds, list) and k in kinds]
    if frozen and attention == "stop_gradient":
        return [(("tint", "train", "kinds"), f"got {', '.join(frozen)} with approximations.attention: stop_gradient, "
                 "under which W_Q, W_K and the q/k norms get no gradient; allowed: approximations.attention: exact, "
                 "or drop them")]
    return []


def _model_checks(data: dict, base: Path) -> list[tuple[Loc, str]]:
    from ir.frontend import ADAPTERS

    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    family = model.get("family")
    if not isinstance(family, str) or family not in ADAPTERS:
        return []  # the schema already reports it; nothing below can be checked
    has_config, has_path = model.get("config") is not None, model.get("path") is not None
    if has_config == has_path:
        loc: Loc = ("model", "path") if has_config else ("model",)
        got = "both model.config and model.path" if has_config else "neither model.config nor model.path"
        return [(loc, f"got {got}; allowed: exactly one of model.config (random init) | model.path")]

    config_class = ADAPTERS[family].config_class
    if has_config:
        problems, hf_config = _hf_config_from_kwargs(config_class, model["config"], ADAPTERS[family].config_keys)
    else:
        problems, hf_config = _hf_config_from_path(config_class, model["path"], base)
    if hf_config is not None and not problems:  # with a misspelt key, the shapes would use defaults
        problems += _shape_checks(data, hf_config, has_config)
        problems += _refused_settings(ADAPTERS[family], hf_config, has_config)
    return problems


def _refused_settings(adapter, hf, from_kwargs: bool) -> list[tuple[Loc, str]]:
    """HF config keys whose setting the TinT cannot simulate (e.g. Gemma 2's soft-capping), by name."""
    refusals = adapter.config_refusals(hf)
    if from_kwargs:
        return [(("model", "config", key), why) for key, why in refusals]
    return [(("model", "path"), f"config.json's {key}: {why}") for key, why in refusals]


def _hf_config_keys(config_class, extra: tuple[str, ...] = ()) -> set[str]:
    keys = set(config_class().to_dict()) | set(extra)
    keys |= set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    keys |= set(getattr(config_class, "attribute_map", {}))
    return keys


def _hf_config_from_kwargs(config_class, kwargs: Any, extra: tuple[str, ...] = ()):
    if not isinstance(kwargs, dict):
        return [], None  # the schema reports the type
    allowed = _hf_config_keys(config_class, extra)
    problems: list[tuple[Loc, str]] = []
    for key in kwargs:
        if key not in allowed:
            name = config_class.__name__
            close = difflib.get_close_matches(str(key), allowed, n=3)
            if close:
                allowed_text = f"a {name} key (closest: {' | '.join(close)})"
            else:
                allowed_text = f"a {name} key: " + " | ".join(sorted(k for k in allowed if not k.startswith("_")))
            problems.append((("model", "config", key), f"unknown {name} key; allowed: {allowed_text}"))
    known = {key: value for key, value in kwargs.items() if key in allowed}
    try:
        return problems, config_class(**known)
    except Exception as err:  # HF validates types field by field; name the field it rejects
        field = re.search(r"field '(\w+)'", str(err))
        expected = re.search(r"expected (.+?), got", str(err))
        loc: Loc = ("model", "config", field.group(1)) if field else ("model", "config")
        got = known.get(field.group(1)) if field else known
        reason = expected.group(1) if expected else str(err).strip().splitlines()[-1].strip()
        return problems + [(loc, f"got {show(got)}; allowed: {reason}")], None


def _hf_config_from_path(config_class, path: Any, base: Path):
    if not isinstance(path, str):
        return [], None
    directory = (base / path).resolve()
    if not directory.is_dir():
        return [(("model", "path"), f"got {path!r} ({directory}); allowed: an existing local directory")], None
    if not (directory / "config.json").is_file():
        return [(("model", "path"), f"got {path!r}, which has no config.json; allowed: a directory written by "
                 "save_pretrained")], None
    try:
        loaded = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return [(("model", "path"), f"got {path!r}, whose config.json is not JSON ({err}); allowed: a directory "
                 "written by save_pretrained")], None
    if not isinstance(loaded, dict):
        return [(("model", "path"), f"got {path!r}, whose config.json holds a {type(loaded).__name__}; allowed: "
                 "a JSON object written by save_pretrained")], None
    model_type = loaded.get("model_type")
    if model_type != config_class.model_type:
        return [
            (("model", "path"), f"got a {model_type!r} model; allowed: a {config_class.model_type!r} model (model.family)")
        ], None
    try:
        return [], config_class.from_pretrained(directory)
    except Exception as err:  # transformers rejects a bad field anywhere: name the file and why
        return [(("model", "path"), f"got {path!r}, whose config.json {config_class.__name__} rejects "
                 f"({str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}); "
                 "allowed: a config written by save_pretrained")], None


def _shape_checks(data: dict, hf, from_kwargs: bool) -> list[tuple[Loc, str]]:
    """Hidden size vs. heads and prefixes; top-N vs. number of layers."""
    names = dict(getattr(type(hf), "attribute_map", {}))  # canonical name -> the family's own key

    def where(canonical: str) -> Loc:
        return ("model", "config", names.get(canonical, canonical)) if from_kwargs else ("model", "path")

    def key(canonical: str) -> str:
        return "model.config." + names.get(canonical, canonical)

    problems: list[tuple[Loc, str]] = []
    hidden, heads, layers = hf.hidden_size, hf.num_attention_heads, hf.num_hidden_layers
    sizes = (("hidden_size", hidden, 1, MAX_SIZE), ("num_attention_heads", heads, 1, MAX_SIZE),
             ("num_hidden_layers", layers, 1, MAX_LAYERS), ("vocab_size", getattr(hf, "vocab_size", None), 1, MAX_VOCAB),
             ("max_position_embeddings", getattr(hf, "max_position_embeddings", None), 2, 1 << 20))
    for canonical, value, low, high in sizes:
        if canonical == "max_position_embeddings" and value is None and not hasattr(hf, canonical):
            continue  # BLOOM (ALiBi): no position table, no limit to check
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            problems.append((where(canonical), f"got {value!r}; allowed: an integer from {low} to {high}"))
    for name, value in hf.to_dict().items():
        if isinstance(value, float) and not math.isfinite(value):
            problems.append((where(name), f"got {value!r}; allowed: a finite number"))
    if problems:
        return problems
    if hidden % heads:
        problems.append(
            (where("num_attention_heads"), f"got {heads}; allowed: a divisor of the hidden size {hidden} ({key('hidden_size')})")
        )

    tint = data.get("tint") if isinstance(data.get("tint"), dict) else {}
    prefixes = tint.get("prefixes", TintSpec.model_fields["prefixes"].default)
    passes = tint.get("passes") if isinstance(tint.get("passes"), dict) else {}
    stacking = passes.get("prefix_stacking") if isinstance(passes.get("prefix_stacking"), dict) else {}
    stacked = stacking.get("enabled", True) is not False  # off: one row per prefix token, K unused
    if stacked and isinstance(prefixes, int) and not isinstance(prefixes, bool) and prefixes >= 1 and hidden % prefixes:
        divisors = " | ".join(str(d) for d in range(1, hidden + 1) if hidden % d == 0)
        problems.append(
            (("tint", "prefixes"), f"got {prefixes}; allowed: a divisor of the hidden size {hidden} ({key('hidden_size')}): {divisors}")
        )

    train = tint.get("train") if isinstance(tint.get("train"), dict) else {}
    match = LAYERS_PATTERN.match(train.get("layers", "all")) if isinstance(train.get("layers", "all"), str) else None
    if match and match.group(2) and int(match.group(2)) > layers:
        problems.append(
            (("tint", "train", "layers"), f"got {train['layers']!r}; allowed: all | top-N with 1 <= N <= {layers} ({key('num_hidden_layers')})")
        )
    return problems
