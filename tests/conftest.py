"""The device of the kernels' oracle tests, and Triton's CPU interpreter when that device is the CPU.

``MOEPLUG_TEST_DEVICE`` = ``cpu`` | ``cuda`` (default: ``cuda`` when torch sees a GPU, else ``cpu``) is the
device the Triton kernel tests (tests/kernels, tests/fp8/test_fp8_kernels.py) put their inputs on; they
get it as the ``device`` fixture and run the same oracle comparisons either way. On ``cuda`` the kernels
compile for the GPU (the ``auto`` or forced ``triton`` backend runs them for CUDA tensors). On ``cpu`` they
run in Triton's interpreter: forcing the ``triton`` backend on CPU tensors needs it, so a GPU machine
without the variable runs the GPU, not an interpreter that would fail on CPU tensors.

Triton decides interpreted vs compiled when ``@triton.jit`` runs, from ``TRITON_INTERPRET``. This is the
root conftest, imported before any test module, so the variable is set before anything in the session can
define a kernel: in a full run a kernel defined compiled by one test and called interpreted by another
fails with "Cannot call @triton.jit'd outside of the scope of a kernel" (seen when this lived in
tests/kernels/conftest.py). Only kernel *definitions* read it, so other packages' tests are unaffected:
they run the torch references on CPU tensors.
"""

import os

import pytest
import torch

DEVICE_ENV_VAR = "MOEPLUG_TEST_DEVICE"


def _test_device() -> torch.device:
    name = os.environ.get(DEVICE_ENV_VAR, "").strip().lower() or ("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"{DEVICE_ENV_VAR}={name!r}: expected 'cpu' or 'cuda'")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{DEVICE_ENV_VAR}=cuda, but torch {torch.__version__} sees no CUDA device")
    return torch.device(name)


TEST_DEVICE = _test_device()
if TEST_DEVICE.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where kernel tests build their inputs (see the module docstring)."""
    if TEST_DEVICE.type == "cuda":
        # tl.dot would use TF32 for fp32 operands by default; the kernels pass input_precision="ieee"
        # exactly when torch's own matmul would not use TF32 (kernels._blocks.input_precision). With TF32
        # off, kernel, torch reference and per-row oracles all stay full fp32 on the GPU, as on the CPU,
        # so the fp32 tolerances (1e-4) hold as stated; with TF32 on they would need ~1e-3 relative.
        torch.backends.cuda.matmul.allow_tf32 = False
    return TEST_DEVICE
