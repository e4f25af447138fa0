"""One intra-op thread for the FP8 tests, and where the fused step's C++ extension is cached.

On the shared 2-core CI machines, torch's second OpenMP thread waits on other processes: measured here,
an FP8AdamW step of a tiny LM took 115 ms with two threads and 15 ms with one, and fwd+bwd 180 ms vs
15 ms. The fixture is autouse only in this directory and restores the previous setting afterwards.
"""

import os
from pathlib import Path

import pytest
import torch

# The fused FP8AdamW step compiles a C++ extension on first use (~30 s); cache it with DeepSpeed's ops in
# the venv (CI rebuilds the venv, so a run compiles it once) rather than in the user's home.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).parents[2] / ".venv" / "torch_extensions"))


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
