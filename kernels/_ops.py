"""Defining the kernels' torch operators cheaply.

Each op is declared with a schema on a ``torch.library.Library`` fragment of the ``moeplug_kernels``
namespace, with one implementation for every device (the implementation picks Triton or torch, see
:mod:`kernels.backend`) and a fake implementation for ``torch.compile`` / ``torch.export`` tracing.
``torch.library.custom_op`` would do the same, but its Python wrapper costs more host time per call than
a small grouped GEMM's math; an MoE block's forward and backward make six such calls, which dominated
small batches and decode steps.

Calling an op still costs a dispatcher round trip into Python, which only tracing needs:
:class:`KernelOp` goes through the dispatcher under ``torch.compile`` / ``torch.export`` and for meta
tensors, and calls the implementation directly otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NAMESPACE = "moeplug_kernels"
_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")


class KernelOp:
    """A defined op: call it like the op; `overload` is the registered ``torch.ops`` overload."""

    def __init__(self, overload: torch._ops.OpOverload, impl: Callable):
        self.overload, self.impl = overload, impl

    def __call__(self, *args):
        if torch.compiler.is_compiling() or args[0].device.type == "meta":
            return self.overload(*args)
        return self.impl(*args)


def define_op(schema: str, impl: Callable, fake: Callable) -> KernelOp:
    """Define ``moeplug_kernels::<schema>`` with `impl` for all devices and `fake` for tracing.

    The op has no autograd kernel: differentiate it with a ``torch.autograd.Function`` around it.
    """
    name = schema.split("(", 1)[0]
    _LIBRARY.define(schema)
    _LIBRARY.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIBRARY)
    return KernelOp(getattr(getattr(torch.ops, NAMESPACE), name).default, impl)


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether a call on `tensors` must record a backward (grad mode on and an input requiring grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
