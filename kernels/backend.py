"""Choose between the Triton kernels and the plain-torch references.

Every public op in ``kernels`` has both implementations with the same signature. Which one runs is
decided per call from the tensors' device and one switch:

* environment variable ``MOEPLUG_KERNELS_BACKEND`` = ``auto`` (default) | ``torch`` | ``triton``;
* :func:`use_backend` (a context manager) overrides the environment inside a ``with`` block.

``auto`` runs Triton for CUDA tensors and the torch reference for CPU tensors. ``triton`` on CPU tensors
runs the Triton interpreter, which only exists when ``TRITON_INTERPRET=1`` was set before the kernels were
defined (Triton decides interpreted vs compiled when ``@triton.jit`` runs); without it this module raises
a clear error instead of letting Triton fail on a CPU pointer.
"""

import contextlib
import os
from collections.abc import Iterator

import torch

ENV_VAR = "MOEPLUG_KERNELS_BACKEND"
BACKENDS = ("auto", "torch", "triton")

_forced: str | None = None


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a kernels backend; expected one of {BACKENDS}")
    return name


def requested_backend() -> str:
    """The backend asked for: the innermost :func:`use_backend`, else ``$MOEPLUG_KERNELS_BACKEND``, else auto."""
    if _forced is not None:
        return _forced
    return _check_name(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``name`` (``auto``, ``torch`` or ``triton``) for every kernels op called inside the block."""
    global _forced
    previous, _forced = _forced, _check_name(name, "use_backend")
    try:
        yield
    finally:
        _forced = previous


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set, i.e. kernels defined now run in Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def use_triton(device: torch.device) -> bool:
    """Whether an op on tensors of ``device`` should run its Triton kernel (else its torch reference).

    Raises ``RuntimeError`` when Triton is forced for CPU tensors without the interpreter enabled.
    """
    name = requested_backend()
    if name == "torch":
        return False
    if device.type == "cuda":
        return True
    if name == "auto":
        return False
    if device.type == "cpu" and interpreter_enabled():
        return True
    raise RuntimeError(
        f"kernels backend 'triton' was forced for {device.type} tensors, but Triton only runs CUDA tensors "
        "or CPU tensors under its interpreter: set TRITON_INTERPRET=1 in the environment before Python "
        "imports the kernels, or use backend 'auto'/'torch'"
    )
