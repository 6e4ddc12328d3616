"""Emission: the TinT as a standalone package that needs only torch and safetensors.

    tint_model.py        the source, from templates/: the runtime (backends/torch/runtime.py: the
                         primitives, the input layer, the prefix encoder and decoder), the standard
                         view (backends/torch/standard.py) and the TinT class, with every layer call
                         spelled out in `forward`, commented
    tint_config.json     the data the code reads: the prefix layout, input fields, each call's
                         wiring (which coordinates it reads and writes), sizes
    weights.safetensors  the primitives' weights (the TinT's state dict; no pickle)

The output is deterministic (no paths, no timestamps). Every file is first written under a
temporary name; they are renamed only once all of them are written.
"""

from __future__ import annotations

import inspect
import json
import keyword
from pathlib import Path

import jinja2
from safetensors.torch import save_file
from torch import nn

import tintc
from tintc.errors import BackendError
from tintc.files import write_files

from . import runtime, standard
from .program import TOKENS, Program, program_json

FORMAT = "tintc.tint/2"  # of tint_config.json; the generated code checks it
SETTINGS = {"Linear": (), "MLP": ("fn",), "Gate": (), "Norm": ("eps",), "Attention": ("softmax", "mask")}

TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("backends.torch", "templates"),
                               undefined=jinja2.StrictUndefined, autoescape=False)


def emit(compiled_or_tint, cfg, directory) -> list[Path]:
    """Write the package for a compiled TinT (a pipeline.Compiled or the TinT itself) into `directory`.
    `cfg` (a TintcConfig, or None) only names the settings in the module's docstring."""
    tint = getattr(compiled_or_tint, "tint", compiled_or_tint)
    program: Program = tint.program
    weights = {name: t.contiguous() for name, t in tint.state_dict().items()}
    return write_files(directory, {
        "tint_model.py": source(program, cfg),
        "weights.safetensors": lambda path: save_file(weights, str(path)),
        "tint_config.json": json.dumps(config(program), indent=2) + "\n",
    })


# -- tint_model.py ------------------------------------------------------------------------
def source(program: Program, cfg=None) -> str:
    code = _body(runtime)
    view = _body(standard).replace(standard.RUNTIME_IMPORT, "# (the runtime's names are defined above)")
    layers = [{"name": name, "constructor": _constructor(name, module)} for name, module in program.layers.items()]
    return TEMPLATES.get_template("tint_model.py.jinja").render(
        version=tintc.__version__, summary=_summary(cfg), format=FORMAT, runtime=code, standard=view, layers=layers,
        calls=[_call(i, c) for i, c in enumerate(program.calls)],
        final_blocks=[(_str(block), _stream(stream)) for block, stream in program.final_blocks.items()],
    ) + "\n"


def _body(module) -> str:
    """A module's source without its docstring."""
    code = inspect.getsource(module)
    return code[code.index('"""', 3) + 3 :].strip()


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
    return _str(value) if isinstance(value, str) else repr(value)


def _summary(cfg) -> str:
    """The settings the TinT was compiled with, for the module's docstring."""
    if cfg is None:
        return "Compiled without a config."
    t, a = cfg.tint.train, cfg.tint.approximations
    return "\n".join([
        f"Compiled from config {cfg.name} ({cfg.model.family}, {cfg.tint.dtype}, K = {cfg.tint.prefixes}):",
        f"    training   {t.steps} SGD step(s), lr {t.lr:g}, layers {t.layers}, loss {t.loss}",
        f"    kinds      {', '.join(t.kinds)}",
        f"    backward   attention {a.attention}, layer norm {a.layer_norm}, activation {a.activation}, "
        f"scale {a.scale:g}",
    ])


# -- tint_config.json ------------------------------------------------------------------------
def config(program: Program) -> dict:
    return {"format": FORMAT, **program_json(program)}
