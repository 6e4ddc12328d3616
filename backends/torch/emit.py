"""Emission: the TinT as a standalone package that needs only torch and safetensors.

    tint_model.py        the source, from templates/: the runtime (the modules runtime.CARRIED names:
                         the primitives, the input layer, the prefix encoder and decoder), the standard
                         view (VIEW: liveness.py, standard_plan.py, standard.py) and the TinT class,
                         with every layer call spelled out in `forward`, commented
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

import ast
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

from . import checks, liveness, runtime, standard, standard_plan
from .program import TOKENS, Program, program_json

FORMAT = "tintc.tint/2"  # of tint_config.json; the generated code checks it
SETTINGS = {"Linear": (), "MLP": ("fn",), "Gate": (), "Norm": ("eps",), "Attention": ("softmax", "mask", "positional", "heads")}

VIEW = (liveness, standard_plan, standard)  # the standard view's modules
CARRIED = (*runtime.CARRIED, *VIEW)  # the modules whose source the package holds, in order
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
    if cfg is not None:  # which backward rules this TinT computes (tint.approximations)
        a = cfg.tint.approximations
        data["backward_rules"] = {"set": a.rule_set, **a.rules, "scale": a.scale}
    package = {"tint_model.py": checks.source_digest(code), "tint_config.json": checks.config_digest(data),
               "weights.safetensors": checks.weights_digest(save(weights))[0]}
    record = json.dumps(package, sort_keys=True)
    code = code.replace("\nPACKAGE = None\n", f"\nPACKAGE = {record}\n", 1)
    return {"tint_model.py": code, "weights.safetensors": save(weights, metadata={"tintc_package": record}),
            "tint_config.json": json.dumps({**data, "package": package}, indent=2) + "\n"}


# -- tint_model.py ------------------------------------------------------------------------
def source(program: Program, version: str, cfg=None) -> str:
    _check_distinct_names(CARRIED)
    code, view = _bodies(runtime.CARRIED), _bodies(VIEW)
    layers = [{"key": _str(name), "constructor": _constructor(name, module)} for name, module in program.layers.items()]
    return TEMPLATES.get_template("tint_model.py.jinja").render(
        version=version, summary=_summary(cfg), format=FORMAT, runtime=code, standard=view, layers=layers,
        calls=[_call(i, c, program.narrowing.get(i), program.released.get(i, ())) for i, c in enumerate(program.calls)],
        final_blocks=[(_str(block), _stream(stream)) for block, stream in program.final_blocks.items()],
    ) + "\n"


def _bodies(modules) -> str:
    """The modules' sources, one after the other, each without its docstring and without its imports
    of carried modules (the package defines them all in one file)."""
    bodies = []
    for module in modules:
        code = inspect.getsource(module)
        tree = ast.parse(code)
        drop = set(range(1, tree.body[0].end_lineno + 1))  # the docstring
        for node in tree.body:
            if _imports_carried(node, module):
                drop |= set(range(node.lineno, node.end_lineno + 1))
            elif isinstance(node, ast.ImportFrom) and (node.level or node.module.split(".")[0] in ("ir", "backends")):
                raise BackendError(f"{module.__name__} line {node.lineno}: imports {node.module} from the compiler, "
                                   "which the package does not hold; allowed: torch, the standard library and the "
                                   "carried modules (emit.CARRIED)")
        bodies.append("\n".join(line for i, line in enumerate(code.split("\n"), 1) if i not in drop).strip())
    return "\n\n\n".join(bodies)


def _imports_carried(node, module) -> bool:
    """Whether a statement of `module` is an import from a carried module."""
    if not isinstance(node, ast.ImportFrom):
        return False
    name = node.module if not node.level else f"{module.__name__.rsplit('.', node.level)[0]}.{node.module}"
    return name in {m.__name__ for m in CARRIED}


def _check_distinct_names(modules) -> None:
    """A top-level name that two carried modules define would make one shadow the other in the package."""
    where: dict[str, str] = {}
    for module in modules:
        for node in ast.parse(inspect.getsource(module)).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            else:
                names = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            for name in names:
                if where.setdefault(name, module.__name__) != module.__name__:
                    raise BackendError(f"{module.__name__} and {where[name]} both define {name!r}; the emitted "
                                       "package holds them in one file; allowed: distinct top-level names")


def _constructor(name: str, module: nn.Module) -> str:
    """`Kind(weight=torch.empty(shape), …, setting=value, …)`: load() assigns the weights."""
    kind = type(module).__name__
    if kind not in SETTINGS:
        raise BackendError(f"layer {name}: primitive {kind} is not in the runtime; allowed: {', '.join(SETTINGS)}")
    shapes = [f"{attr}={'None' if w is None else w.literal()}" for attr, w in runtime.projections(module).items()]
    settings = [f"{s}={_literal(getattr(module, s))}" for s in SETTINGS[kind]]
    return f"{kind}({', '.join(shapes + settings)})"


def _call(index: int, call, narrow: int | None = None, released: tuple = ()) -> dict:
    """The template's view of a call (narrow: where the token stream's tail is let go before it, if it is;
    released: the block versions dropped after it)."""
    layer = f"L.{call.layer}" if _attribute(call.layer) else f"L[{_str(call.layer)}]"
    into = _stream(call.write.stream) if call.write.base is None else f"{_stream(call.write.base)}.clone()"
    return {"node": call.node, "op": call.op, "phase": call.phase, "layer": layer, "index": index,
            "streams": [_stream(r.stream) for r in call.reads], "target": _stream(call.write.stream),
            "into": into, "gated": call.write.base is None, "narrow": narrow,
            "released": [_stream(name) for name in released]}


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
        f"    training   {t.steps} SGD step(s), lr {t.lr:g} unless forward is given another, layers {t.layers}, "
        f"loss {t.loss}",
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
