# SPDX-License-Identifier: Apache-2.0
"""help() of every public callable documents each of its parameters (by name), and every
public module has a docstring."""

from __future__ import annotations

import inspect
import re

import pytest

import packed_kernels as pk
from packed_kernels import export as pk_export
from packed_kernels import models, nn

SKIPPED_PARAMETERS = {"self", "args", "kwargs", "onnx_options"}


def _public(module, names):
    return [(f"{module.__name__}.{name}", getattr(module, name)) for name in names]


PUBLIC = (_public(pk, pk.__all__) + _public(nn, nn.__all__) + _public(models, models.__all__)
          + _public(pk_export, ["export", "to_onnx", "decomposition_table"]))


def _documented_signature(obj):
    """(signature, documentation) as help() shows them: a class's signature is its __init__'s
    (inherited too), and that __init__'s doc counts where this library wrote it."""
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj) and getattr(obj.__init__, "__module__", "").startswith("packed_kernels"):
        doc += "\n" + (inspect.getdoc(obj.__init__) or "")
    try:
        return inspect.signature(obj), doc
    except (TypeError, ValueError):
        return None, doc


@pytest.mark.parametrize("name, obj", [p for p in PUBLIC if not isinstance(p[1], (tuple, list))],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_documents_every_parameter(name, obj):
    if inspect.ismodule(obj):
        assert (inspect.getdoc(obj) or "").strip(), f"module {name} has no docstring"
        return
    signature, doc = _documented_signature(obj)
    assert doc.strip(), f"{name} has no docstring"
    if signature is None:
        return
    missing = [p for p in signature.parameters if p not in SKIPPED_PARAMETERS
               and not re.search(rf"\b{re.escape(p)}\b", doc)]
    assert not missing, f"{name}'s docstring does not mention {missing}"


@pytest.mark.parametrize("op", [pk.grouped_conv2d, pk.fused_conv2d, pk.batch_norm,
                                pk.ensemble_mean, pk.ensemble_scores])
def test_ops_document_backend_shapes_and_dtypes(op):
    doc = inspect.getdoc(op)
    for word in ("backend", "BackendUnavailableError", "dtype", "Returns"):
        assert word in doc, f"{op.__name__}: no {word!r}"
    assert re.search(r"\(M\*B, C|\(N, C", doc), f"{op.__name__}: no input shape"
