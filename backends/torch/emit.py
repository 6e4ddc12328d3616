"""Emission: the TinT as a standalone package that needs only torch and safetensors.

    tint_model.py        the source, from templates/: one class per primitive kind used, and
                         every layer call spelled out in `forward` with its fields as literal slices
    weights.safetensors  the primitives' weights (the TinT's state dict; no pickle)
    tint_config.json     the data the code reads: the prefix layout, input fields, sizes

The output is deterministic (no paths, no timestamps). Every file is first written under a
temporary name; they are renamed only once all of them are written.
"""

from __future__ import annotations

import json
import keyword
from pathlib import Path
from typing import Callable

import jinja2
from safetensors.torch import save_file
from torch import nn

import tintc
from tintc.errors import BackendError

from .lower import TOKENS, Program, Read
from .prefixes import Layout

FORMAT = "tintc.tint/1"  # of tint_config.json; the generated code checks it
KINDS = ("Linear", "MLP", "Gate", "Norm", "Attention")  # one template each, in templates/primitives/
SETTINGS = {"Linear": (), "MLP": ("fn",), "Gate": (), "Norm": ("eps",), "Attention": ("heads", "softmax", "mask")}
ACTIVATION_SOURCE = {"gelu_tanh": "gelu_tanh", "gelu": "F.gelu", "relu": "F.relu"}  # as spelled in MLP.py.jinja

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


def write_files(directory, files: dict[str, str | Callable[[Path], None]]) -> list[Path]:
    """Write each file (text, or a function that writes the path it is given) under a temporary
    name, then rename them all; on failure remove the temporary files and keep what was there."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    temporary = {}
    try:
        for name, content in files.items():
            tmp = temporary[name] = directory / f".{name}.tmp"
            if callable(content):
                content(tmp)
            else:
                tmp.write_text(content, encoding="utf-8")
    except BaseException:
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)
        raise
    for name, tmp in temporary.items():
        tmp.chmod(0o644)
        tmp.replace(directory / name)
    return [directory / name for name in files]


# -- tint_model.py ------------------------------------------------------------------------
def source(program: Program, cfg=None) -> str:
    layers = [{"name": name, "constructor": _constructor(name, module)} for name, module in program.layers.items()]
    used = {type(m).__name__ for m in program.layers.values()}
    activations = sorted({m.fn for m in program.layers.values() if type(m).__name__ == "MLP"})
    unknown = [fn for fn in activations if fn not in ACTIVATION_SOURCE]
    if unknown:
        raise BackendError([f"activation {fn!r} has no emitted source; allowed: {', '.join(ACTIVATION_SOURCE)}"
                            for fn in unknown], "cannot emit the TinT")
    return TEMPLATES.get_template("tint_model.py.jinja").render(
        version=tintc.__version__, summary=_summary(cfg), format=FORMAT,
        kinds=[k for k in KINDS if k in used], activations=activations, activation_source=ACTIVATION_SOURCE,
        layers=layers, calls=[_call(c) for c in program.calls],
        logits=_gather(Read(TOKENS, (program.logits,))),
        final_blocks=[(_str(block), _stream(stream)) for block, stream in program.final_blocks.items()],
    ) + "\n"


def _constructor(name: str, module: nn.Module) -> str:
    """`Kind(weight=shape, …, setting=value, …)`: the weights' shapes and the settings, as literals."""
    kind = type(module).__name__
    if kind not in SETTINGS:
        raise BackendError(f"layer {name}: primitive {kind} has no template; allowed: {', '.join(KINDS)}")
    shapes = [f"{p}={tuple(t.shape)}" for p, t in module.named_parameters(recurse=False)]
    settings = [f"{s}={_literal(getattr(module, s))}" for s in SETTINGS[kind]]
    return f"{kind}({', '.join(shapes + settings)})"


def _call(call) -> dict:
    if len(call.write.fields) != 1:
        raise BackendError(f"call of {call.layer} for %{call.node}: writes {len(call.write.fields)} fields; "
                           "expected one")
    layer = f"L.{call.layer}" if _attribute(call.layer) else f"L[{_str(call.layer)}]"
    return {"node": call.node, "op": call.op, "phase": call.phase, "layer": layer,
            "args": [_gather(r) for r in call.reads], "target": _gather(call.write),
            "base": call.base, "target_stream": _stream(call.write.stream),
            "base_stream": _stream(call.base) if call.base else None}


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


def _gather(read: Read) -> str:
    """A read as an expression: the stream, a slice of it, or its slices concatenated."""
    stream = _stream(read.stream)
    parts = [f"{stream}[..., {f.start}:{f.stop}]" for f in read.fields]
    if not parts:
        return stream
    return parts[0] if len(parts) == 1 else f"torch.cat([{', '.join(parts)}], -1)"


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
    return {
        "format": FORMAT,
        "width": program.width,
        "max_length": program.max_length,
        "inputs": {name: [f.start, f.width] for name, f in program.inputs.items()},
        "logits": [program.logits.start, program.logits.width],
        "layout": _layout(program.layout),
    }


def _layout(layout: Layout) -> dict:
    def ref(r) -> dict:
        return {"name": r.name, "transpose": r.transpose, "rows": list(r.rows) if r.rows is not None else None}

    blocks = {name: {"kind": b.kind, "refs": {slot: ref(r) for slot, r in b.refs.items()}, "d_in": b.d_in,
                     "d_out": b.d_out, "tokens": b.tokens, "rows": b.rows, "width": b.width}
              for name, b in layout.blocks.items()}
    return {"vocab": ref(layout.vocab), "positions": ref(layout.positions), "unembed": ref(layout.unembed),
            "tied": layout.tied, "position_offset": layout.position_offset,
            "shapes": {name: list(shape) for name, shape in layout.shapes.items()}, "blocks": blocks}
