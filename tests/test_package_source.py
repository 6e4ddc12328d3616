"""What the emitted package's source is made of (backends/torch/emit.py): the carried modules, their
imports of each other dropped, one activation table (ir/activations.py) for every consumer; a
carried module that imports the compiler, or two that define one name, are refused by name."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch

from backends.torch import emit, primitives, runtime, standard, standard_plan
from ir import activations, rules
from ir.errors import BackendError


def _module(tmp_path, name: str, code: str):
    path = tmp_path / f"{name}.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # inspect.getsource finds the file through it
    spec.loader.exec_module(module)
    return module


def test_the_carried_sources_drop_their_imports_of_each_other_and_keep_the_rest():
    code = emit._bodies(emit.CARRIED)
    assert "from .projection import" not in code and "from ir.activations import" not in code
    assert "def as_projection(w):" in code and "ACTIVATIONS = {" in code and "class StandardTinT(nn.Module):" in code
    assert "import torch" in code
    assert code.count('"""The TinT runtime') == 0  # docstrings dropped: the package has its own


def test_a_carried_module_importing_the_compiler_is_refused(tmp_path):
    bad = _module(tmp_path, "carried_bad", '"""doc"""\nimport torch\nfrom ir.graph import Graph\n')
    with pytest.raises(BackendError, match=r"carried_bad line 3: imports ir.graph from the compiler"):
        emit._bodies([bad])


def test_two_carried_modules_defining_one_name_are_refused(tmp_path):
    first = _module(tmp_path, "carried_one", '"""doc"""\ndef helper():\n    return 1\n')
    second = _module(tmp_path, "carried_two", '"""doc"""\nhelper = 2\n')
    emit._check_distinct_names(emit.CARRIED)  # the real modules pass
    with pytest.raises(BackendError, match=r"carried_two and carried_one both define 'helper'"):
        emit._check_distinct_names([first, second])


def test_one_activation_table_serves_the_rules_the_executor_and_the_standard_view():
    assert rules.ACTIVATION_FNS is activations.ACTIVATIONS
    assert primitives.ACTIVATIONS is standard.ACTIVATIONS is standard_plan.ACTIVATIONS is activations.ACTIVATIONS
    assert runtime.CARRIED[0] is activations  # the package defines it before its users


def test_tanh_gelu_is_gpt2s_formula():
    xs = [-3.0, -0.5, 0.0, 0.7, 2.5]
    expected = [0.5 * x * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))) for x in xs]
    got = activations.ACTIVATIONS["gelu_tanh"](torch.tensor(xs, dtype=torch.float64))
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-15, atol=1e-16)
