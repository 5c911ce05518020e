# SPDX-License-Identifier: Apache-2.0
"""Deployment without packed_kernels: torch.export and ONNX programs of models built on its ops.

A model whose layers call packed_kernels ops traces (torch.export.export) to a program holding
`packed_kernels::*` nodes, which only a process that imported packed_kernels can run, and which
no ONNX exporter knows. `export` decomposes those nodes into stock aten ops
(packed_kernels/ops/decompositions.py: each op's torch reference), so its program

- runs, serialises (torch.export.save) and loads (torch.export.load) in a process that never
  imports packed_kernels, and, holding core aten ops only, is what AOTInductor takes (not
  tested here);
- converts to ONNX (`to_onnx`), for onnxruntime, TensorRT, ...

No backend needs choosing first (set_backend(model, "stock") is not needed): whatever engine a
layer names, its op decomposes to the same torch function. Export a model in eval() mode for
inference: a training-mode program computes batch statistics and updates running buffers.

TorchScript is not supported: torch.jit.script of a model holding packed_kernels modules
raises a TypeError saying so (torch no longer develops TorchScript, and it cannot see through
the custom ops); use this module instead."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

from . import models as _models
from . import nn as _nn
from .ops.decompositions import DECOMPOSITIONS

NAMESPACE = "packed_kernels"


def decomposition_table() -> Dict[Any, Any]:
    """torch.export's default decomposition table (to core aten) plus one entry per
    packed_kernels custom op; pass it to `ExportedProgram.run_decompositions` to decompose a
    program exported by torch.export.export directly."""
    table = torch.export.default_decompositions()
    table.update(DECOMPOSITIONS)
    return table


def _remaining_library_ops(program: torch.export.ExportedProgram) -> list:
    return sorted({str(node.target) for module in program.graph_module.modules()
                   if isinstance(module, torch.fx.GraphModule)
                   for node in module.graph.nodes
                   if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
                   and node.target.namespace == NAMESPACE})


def export(model: nn.Module, args: Sequence[Any], kwargs: Optional[Dict[str, Any]] = None, *,
           dynamic_shapes: Optional[Union[Dict[str, Any], Sequence[Any]]] = None,
           strict: bool = False) -> torch.export.ExportedProgram:
    """torch.export.export(model, args, kwargs, dynamic_shapes=, strict=), then every
    packed_kernels op decomposed into core aten ops.

    Args:
        model: an nn.Module (any packed_kernels model or layer, or one containing them); put it
            in eval() mode to export inference.
        args: the example positional inputs, a tuple (e.g. `(torch.randn(8, 3, 32, 32),)` for
            an image model: (N, C, H, W), any dtype and layout the model accepts). Their
            device is the program's device.
        kwargs: example keyword inputs, or None.
        dynamic_shapes: as torch.export.export's (e.g. `({0: torch.export.Dim("batch")},)` for
            a dynamic batch); None: every shape is fixed to the example's.
        strict: torch.export.export's `strict` (False: non-strict tracing, which runs the
            model's Python as is).

    Returns:
        An ExportedProgram of core aten ops only: `.module()(*args)` runs it, and
        torch.export.save / load, AOTInductor and `to_onnx` take it, none of them needing
        packed_kernels.

    Raises:
        RuntimeError: naming any packed_kernels op left undecomposed (none should be)."""
    program = torch.export.export(model, tuple(args), kwargs, dynamic_shapes=dynamic_shapes,
                                  strict=strict)
    program = program.run_decompositions(decomposition_table())
    left = _remaining_library_ops(program)
    if left:
        raise RuntimeError(f"export: no decomposition for {', '.join(left)}")
    return program


def to_onnx(model: Union[nn.Module, torch.export.ExportedProgram], args: Sequence[Any] = (),
            f: Optional[str] = None, *, kwargs: Optional[Dict[str, Any]] = None,
            dynamic_shapes: Optional[Union[Dict[str, Any], Sequence[Any]]] = None,
            opset_version: Optional[int] = None, **onnx_options) -> "torch.onnx.ONNXProgram":
    """The ONNX program of `model`: `export(model, args, kwargs, dynamic_shapes=)` converted by
    torch.onnx.export's dynamo exporter (which needs the `onnx` and `onnxscript` packages).

    Args:
        model: an nn.Module (exported here first), or a program `export` returned (then `args`,
            `kwargs` and `dynamic_shapes` are not used).
        args, kwargs, dynamic_shapes: as for `export`.
        f: a path to save the .onnx file to, or None (then call `.save(path)` on the result,
            or read `.model_proto`).
        opset_version: the ONNX opset, or None for torch.onnx's default.
        **onnx_options: passed on to torch.onnx.export (e.g. `input_names`, `optimize`).

    Returns:
        torch.onnx.ONNXProgram (its `.model_proto` is the onnx.ModelProto)."""
    if isinstance(model, torch.export.ExportedProgram):
        program = model
    else:
        program = export(model, args, kwargs, dynamic_shapes=dynamic_shapes)
    return torch.onnx.export(program, f=f, dynamo=True, opset_version=opset_version,
                             **onnx_options)


def _refuse_torchscript(module: nn.Module):
    """TorchScript is not supported: raises TypeError (see packed_kernels.export)."""
    raise TypeError(
        f"torch.jit.script: {type(module).__name__} (packed_kernels) does not support "
        "TorchScript, which torch no longer develops; use packed_kernels.export.export "
        "(torch.export, no packed_kernels needed to run it), packed_kernels.export.to_onnx, or "
        "torch.compile")


# torch.jit.script calls __prepare_scriptable__ on the module and each submodule first: a model
# holding any of our modules is refused with the message above, rather than failing deep inside
# the TorchScript compiler on an attribute it cannot type.
for _package in (_nn, _models):
    for _name in _package.__all__:
        _cls = getattr(_package, _name)
        if isinstance(_cls, type) and issubclass(_cls, nn.Module):
            _cls.__prepare_scriptable__ = _refuse_torchscript
