"""Run the Triton kernels under Triton's CPU interpreter when no GPU is present.

Triton decides interpreted vs compiled when ``@triton.jit`` runs, from ``TRITON_INTERPRET``. This is the
root conftest, imported before any test module, so the variable is set before anything in the session can
define a kernel: in a full run a kernel defined compiled by one test and called interpreted by another
fails with "Cannot call @triton.jit'd outside of the scope of a kernel" (seen when this lived in
tests/kernels/conftest.py). Only kernel *definitions* read it, so other packages' tests are unaffected:
they run the torch references on CPU tensors. With a GPU the kernels compile for it instead.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
