# SPDX-License-Identifier: Apache-2.0
"""README.md's API section names every public function and class of the package (its
signatures are checked against the code by tests/test_docstrings.py's docstrings, not here)."""

import importlib
import inspect
import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
API = README[README.index("## API"):README.index("## Support matrix")]


def _public(module_name: str):
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    if names is None:  # the functions the module defines itself
        names = [n for n, v in vars(module).items() if not n.startswith("_")
                 and inspect.isfunction(v) and v.__module__ == module_name]
    return sorted(names)


@pytest.mark.parametrize("module", ["packed_kernels", "packed_kernels.nn", "packed_kernels.models",
                                    "packed_kernels.metrics", "packed_kernels.dispatch",
                                    "packed_kernels.export"])
def test_the_api_section_names_every_public_name(module):
    names = _public(module)
    assert names, f"{module} exports nothing: the check would pass vacuously"
    missing = [n for n in names if not re.search(rf"\b{re.escape(n)}\b", API)]
    assert not missing, f"README.md's API section does not mention {module}'s {missing}"
