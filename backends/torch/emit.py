"""Emission: the TinT as a standalone package that needs only torch and safetensors.

    tint_model.py        the source, from templates/: the runtime (backends/torch/runtime.py: the
                         primitives, the input layer, the prefix encoder and decoder), the standard
                         view (backends/torch/standard.py) and the TinT class, with every layer call
                         spelled out in `forward`, commented
    tint_config.json     the data the code reads: the prefix layout, input fields, each call's
                         wiring (which coordinates it reads and writes), sizes
    weights.safetensors  the primitives' weights (the TinT's state dict; no pickle)

The three files record one package digest (checks.py); the generated load() refuses a
package whose parts do not match. No text from the config reaches the code except
through json.dumps (a string literal that cannot end the docstring or the literal). The
output is deterministic (no paths, no timestamps). `package_files` returns the files;
the caller writes them as one set (tintc/files.py).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import keyword
from pathlib import Path

import math

import jinja2
from safetensors.torch import save
from torch import nn

from ir.errors import BackendError

from . import checks, runtime, standard
from .program import TOKENS, Program, program_json

FORMAT = "tintc.tint/2"  # of tint_config.json; the generated code checks it
SETTINGS = {"Linear": (), "MLP": ("fn",), "Gate": (), "Norm": ("eps",), "Attention": ("softmax", "mask")}

TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("backends.torch", "templates"),
                               undefined=jinja2.StrictUndefined, autoescape=False)


def package_files(compiled_or_tint, cfg, version: str) -> dict[str, str | bytes]:
    """tint_model.py, tint_config.json and weights.safetensors, each recording the package digest.
    `cfg` (a TintcConfig, or None) only names the settings in the module's docstring; `version` is
    the compiler's, recorded in the code."""
    tint = getattr(compiled_or_tint, "tint", compiled_or_tint)
    program: Program = tint.program
    weights = {name: t.contiguous() for name, t in tint.state_dict().items()}
    code, data = source(program, version, cfg), config(tint)
    package = {"tint_model.py": checks.source_digest(code), "tint_config.json": checks.config_digest(data),
               "weights.safetensors": checks.weights_digest(save(weights))[0]}
    record = json.dumps(package, sort_keys=True)
    code = code.replace("\nPACKAGE = None\n", f"\nPACKAGE = {record}\n", 1)
    return {"tint_model.py": code, "weights.safetensors": save(weights, metadata={"tintc_package": record}),
            "tint_config.json": json.dumps({**data, "package": package}, indent=2) + "\n"}


# -- tint_model.py ------------------------------------------------------------------------
def source(program: Program, version: str, cfg=None) -> str:
    code = "\n\n\n".join(_body(module) for module in (checks, runtime))
    view = _body(standard).replace(standard.RUNTIME_IMPORT, "# (the runtime's names are defined above)")
    layers = [{"key": _str(name), "constructor": _constructor(name, module)} for name, module in program.layers.items()]
    return TEMPLATES.get_template("tint_model.py.jinja").render(
        version=version, summary=_summary(cfg), format=FORMAT, runtime=code, standard=view, layers=layers,
        calls=[_call(i, c) for i, c in enumerate(program.calls)],
        final_blocks=[(_str(block), _stream(stream)) for block, stream in program.final_blocks.items()],
    ) + "\n"


def _body(module) -> str:
    """A module's source without its docstring and without runtime's import of checks (the package
    defines both in one file)."""
    code = inspect.getsource(module)
    lines = code[code.index('"""', 3) + 3 :].strip().split("\n")
    return "\n".join(line for line in lines if not line.startswith("from .checks import"))


def _constructor(name: str, module: nn.Module) -> str:
    """`Kind(weight=torch.empty(shape), …, setting=value, …)`: load() assigns the weights."""
    kind = type(module).__name__
    if kind not in SETTINGS:
        raise BackendError(f"layer {name}: primitive {kind} is not in the runtime; allowed: {', '.join(SETTINGS)}")
    shapes = [f"{attr}={_weight_literal(getattr(module, attr))}" for attr in runtime.WEIGHTS[type(module)]]
    settings = [f"{s}={_literal(getattr(module, s))}" for s in SETTINGS[kind]]
    return f"{kind}({', '.join(shapes + settings)})"


def _weight_literal(w) -> str:
    if w is None:
        return "None"
    if isinstance(w, runtime.Diagonal):
        return f"Diagonal(torch.empty{tuple(w.diagonal.shape)}, identity={w.identity})"
    if isinstance(w, runtime.Selection):
        n = len(w.coef)
        return f"Selection(torch.empty({n}, dtype=torch.long), torch.empty({n}), {w.columns})"
    if isinstance(w, runtime.LowRank):
        return f"LowRank(torch.empty{tuple(w.left.shape)}, torch.empty{tuple(w.right.shape)})"
    return f"torch.empty{tuple(w.shape)}"


def _call(index: int, call) -> dict:
    layer = f"L.{call.layer}" if _attribute(call.layer) else f"L[{_str(call.layer)}]"
    into = _stream(call.write.stream) if call.write.base is None else f"{_stream(call.write.base)}.clone()"
    return {"node": call.node, "op": call.op, "phase": call.phase, "layer": layer, "index": index,
            "streams": [_stream(r.stream) for r in call.reads], "target": _stream(call.write.stream),
            "into": into, "gated": call.write.base is None}


def _attribute(name: str) -> bool:
    """Whether `L.name` reaches the layer (and not a ModuleDict method)."""
    return name.isidentifier() and not keyword.iskeyword(name) and not hasattr(nn.ModuleDict, name)


def _stream(name: str) -> str:
    """The variable holding a stream: h (the tokens), unembed, or s["block@version"]."""
    return {TOKENS: "h", "unembed": "unembed"}.get(name, f"s[{_str(name)}]")


def _str(text: str) -> str:
    """A Python string literal in double quotes."""
    return json.dumps(text)


def _literal(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return f'float("{value}")'  # inf, -inf, nan have no literal
    return _str(value) if isinstance(value, str) else repr(value)


def _summary(cfg) -> str:
    """The settings the TinT was compiled with, for the module's docstring."""
    if cfg is None:
        return "Compiled without a config."
    t, a = cfg.tint.train, cfg.tint.approximations
    return "\n".join([
        f"Compiled from config {_str(cfg.name)} ({cfg.model.family}, {cfg.tint.dtype}, K = {cfg.tint.prefixes}):",
        f"    training   {t.steps} SGD step(s), lr {t.lr:g}, layers {t.layers}, loss {t.loss}",
        f"    kinds      {', '.join(t.kinds)}",
        f"    backward   attention {a.attention}, layer norm {a.layer_norm}, activation {a.activation}, "
        f"scale {a.scale:g}",
    ])


# -- tint_config.json ------------------------------------------------------------------------
def config(tint) -> dict:
    return {"format": FORMAT, "label_only": tint.label_only, **program_json(tint.program)}


def import_package(directory, name: str | None = None):
    """The emitted tint_model.py of `directory`, imported as a module under a name of its own (so
    that several packages can be loaded side by side; nothing is added to sys.modules)."""
    directory = Path(directory)
    name = name or f"tint_model_{abs(hash(str(directory.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, directory / "tint_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
