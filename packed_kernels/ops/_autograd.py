# SPDX-License-Identifier: Apache-2.0
"""The custom ops' plumbing: registration with an eager fast path, and output aliasing."""

from __future__ import annotations

from operator import itemgetter
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

any_requires_grad = getattr(torch._C, "_any_requires_grad", None) or (
    lambda *args: any(isinstance(a, Tensor) and a.requires_grad for a in args))


_is_compiling = torch.compiler.is_compiling  # bound once: traced() is on every eager call


def traced() -> bool:
    """Inside torch.compile / torch.export, or under a dispatch-mode tracer (make_fx, fake
    tensors, functionalization): calls must go through the registered op."""
    return _is_compiling() or is_in_torch_dispatch_mode()


class LibraryOp:
    """A torch.library custom op (what torch.compile, export, fake tensors and opcheck see, as
    `.op`) whose eager calls skip torch's dispatcher: they run the implementation directly, and
    through an autograd.Function with the op's own setup_context and backward when an input
    requires grad. Same function and gradients; the dispatcher's ~30 µs per call on a small
    host CPU is gone."""

    def __init__(self, name: str, impl: Callable):
        self.name, self.impl = name, impl
        self.op = torch.library.custom_op(name, mutates_args=())(impl)
        self._function = None
        arguments = self.op._opoverload._schema.arguments
        tensors = [i for i, arg in enumerate(arguments)
                   if arg.type.isSubtypeOf(torch._C.OptionalType.ofTensor())]
        # positional calls ask about the tensor arguments alone (asking about the ints, strings
        # and lists as well costs as much again); a position twice keeps itemgetter's tuple
        self._arity, self._tensor_args = len(arguments), itemgetter(*tensors, *tensors[:1])
        self.__doc__ = impl.__doc__

    def register_fake(self, fake: Callable) -> Callable:
        self.op.register_fake(fake)
        return fake

    def register_autograd(self, backward: Callable, setup_context: Callable) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self.impl

        def forward(ctx, *args):  # ctx-style: no per-call signature binding (~50 us saved)
            output = impl(*args)
            setup_context(ctx, args, output)
            return output
        self._function = type(self.name.replace("::", "_"), (torch.autograd.Function,), dict(
            forward=staticmethod(forward), backward=staticmethod(once_differentiable(backward))))

    def __call__(self, *args, **kwargs):
        if traced():
            return self.op(*args, **kwargs)
        if (self._function is not None and torch.is_grad_enabled()
                and any_requires_grad(*(self._tensor_args(args) if len(args) == self._arity
                                         else args), *kwargs.values())):
            if kwargs:
                raise TypeError(f"{self.name}: differentiable calls take positional arguments")
            return self._function.apply(*args)
        return self.impl(*args, **kwargs)


def library_op(name: str) -> Callable[[Callable], LibraryOp]:
    """Decorator: registers `impl` as the custom op `name` (schema from its annotations)."""
    return lambda impl: LibraryOp(name, impl)


def unaliased(outputs: Sequence[Optional[Tensor]], inputs: Sequence[Optional[Tensor]], empty_like: Tensor) -> tuple:
    """Custom-op outputs may not alias inputs or each other: copy those that do, and stand an
    empty tensor in for None (a custom op cannot return None)."""
    seen = {t.data_ptr() for t in inputs if t is not None and t.numel() > 0}
    result = []
    for t in outputs:
        if t is None:
            t = empty_like.new_zeros(0)
        elif t.numel() > 0 and t.data_ptr() in seen:
            t = t.clone()
        if t.numel() > 0:
            seen.add(t.data_ptr())
        result.append(t)
    return tuple(result)
