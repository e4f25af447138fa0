"""One intra-op thread for the FP8 tests.

On the shared 2-core CI machines, torch's second OpenMP thread waits on other processes: measured here,
an FP8AdamW step of a tiny LM took 115 ms with two threads and 15 ms with one, and fwd+bwd 180 ms vs
15 ms. The fixture is autouse only in this directory and restores the previous setting afterwards.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
