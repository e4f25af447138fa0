"""Fused CPU FP8AdamW step: a C++ extension (``_fp8_cpu.cpp``) compiled on first use.

The CPU implementation of :func:`kernels.fp8_adamw.fp8_adamw_step`, which calls it. The torch reference of
the step (:func:`kernels.fp8_adamw.fp8_adamw_step_torch`: dequantise, :func:`kernels.fp8_adamw.adamw_math`, quantise)
makes ~40 passes over the data and ~50 op dispatches per tensor; this does one pass per group of 128
values, eight lanes at a time, groups spread over torch's intra-op threads. Instead of the reference's
per-value log2/exp2 it decodes through per-group tables and encodes with a log2 polynomial; the error bound
this gives against the reference (at most one E4M3 step per code where the group's k16 agrees, k16 within
one) is derived in ``_fp8_cpu.cpp`` and tested in tests/fp8/test_fp8_fused.py.

The build uses :func:`torch.utils.cpp_extension.load` (g++ and ninja; cached under
``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``; ~30 s the first time) with the
vector width torch itself dispatches to (AVX512 and AVX2 builds use AVX2; otherwise SSE). :func:`load_extension` returns ``None``
and warns once when the build fails, and callers fall back to the torch reference.
"""

import functools
import math
import warnings
from pathlib import Path

import torch

__all__ = ["load_extension", "fp8_adamw_step"]

_SOURCE = Path(__file__).with_name("_fp8_cpu.cpp")
# Compiler flags per torch CPU capability: the same at::vec::Vectorized specialisation torch runs.
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512",
               "-DCPU_CAPABILITY=AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
}


@functools.cache
def load_extension():
    """The compiled extension module, or ``None`` (with one warning) when it cannot be built here."""
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _CAPABILITY_FLAGS.get(capability, ["-DCPU_CAPABILITY=DEFAULT"])
    try:
        from torch.utils.cpp_extension import load

        return load(
            name=f"moeplug_fp8_cpu_{capability.lower()}",
            sources=[str(_SOURCE)],
            # Multiply-adds may fuse (the polynomials' error bounds hold either way); -fno-math-errno lets
            # sqrt vectorise (it changes no result); -fopenmp: at::parallel_for's OpenMP pragmas (torch's libgomp).
            extra_cflags=["-O3", "-ffp-contract=fast", "-fno-math-errno", "-fopenmp", *flags],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # noqa: BLE001 - any build failure means "use the torch path"
        warnings.warn(f"FP8AdamW: the fused CPU step could not be built ({type(err).__name__}: {err}); "
                      "using the slower torch path", RuntimeWarning, stacklevel=2)
        return None


def fp8_adamw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    group_size: int,
) -> None:
    """One fused FP8AdamW step, in place, on contiguous fp32 CPU ``params`` and their FP8 ``states``.

    ``states`` are FP8AdamW state dicts (``exp_avg``/``exp_avg_sq`` codes with their ``_amax`` and
    ``_k16``); ``steps`` the 1-based step number of each parameter. Raises ``RuntimeError`` when the
    extension is unavailable (check :func:`load_extension` first).
    """
    ext = load_extension()
    if ext is None:
        raise RuntimeError("the fused FP8AdamW CPU extension is not available (see the earlier warning)")
    moments = {key: [s[key] for s in states] for key in
               ("exp_avg", "exp_avg_amax", "exp_avg_k16", "exp_avg_sq", "exp_avg_sq_amax", "exp_avg_sq_k16")}
    ext.fp8_adamw_step(
        params, grads,
        [c.view(torch.uint8) for c in moments["exp_avg"]], moments["exp_avg_amax"], moments["exp_avg_k16"],
        [c.view(torch.uint8) for c in moments["exp_avg_sq"]], moments["exp_avg_sq_amax"],
        moments["exp_avg_sq_k16"],
        [1 - beta1**s for s in steps], [math.sqrt(1 - beta2**s) for s in steps],
        lr, beta1, beta2, eps, weight_decay, group_size,
    )
