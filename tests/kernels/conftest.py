"""Run the Triton kernels under Triton's CPU interpreter when no GPU is present.

Triton decides interpreted vs compiled when ``@triton.jit`` runs, from ``TRITON_INTERPRET``. ``kernels``
defines its kernels lazily (on the first Triton call), so setting the variable here, when pytest imports
this conftest and before any kernels test runs, is enough. Only kernel *definitions* read it, and every
kernel of the suite lives in ``kernels``, so other packages' tests in the same process are unaffected:
they run the torch references on CPU tensors. With a GPU the kernels compile for it instead.
A subprocess per test would isolate it further but costs a torch import (seconds) per test.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
