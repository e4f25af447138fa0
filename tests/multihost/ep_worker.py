"""torchrun worker for the multi-host harness: one MoE layer, EP over every rank, flat then hierarchical.

    python -m tests.multihost.harness --hosts 2 --procs 2 -- tests/multihost/ep_worker.py OUT_DIR

Each rank saves OUT_DIR/rank{r}.pt: per dispatch mode its output, input gradient, gradients, whether
the layout was hierarchical, and the bytes its host's link sent during a larger forward + backward
(read by local rank 0 of each host between barriers, so only that step's traffic counts).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from moeplug.dispatch import allreduce_gradients
from tests.distributed.test_expert_parallel_gloo import HIDDEN, _layer, _layer_case
from tests.multihost.harness import link_bytes

BYTES_TOKENS = 512  # per rank, for the traffic measurement: payload >> per-message overhead


def _step_bytes(layer, rank: int) -> int:
    """Bytes this host's link sent during one forward + backward on BYTES_TOKENS tokens (0 off local rank 0)."""
    x = torch.randn(BYTES_TOKENS, HIDDEN, generator=torch.Generator().manual_seed(100 + rank))
    dist.barrier()
    before = link_bytes()["tx"]
    layer(x).sum().backward()
    dist.barrier()
    sent = link_bytes()["tx"] - before
    return sent if int(os.environ["LOCAL_RANK"]) == 0 else 0


def _run(mode: str, world: int) -> dict:
    os.environ["MOEPLUG_DISPATCH"] = mode
    result = _layer_case(world, world, {})  # output and gradients on the small tokens
    layer = _layer(world)
    sent = _step_bytes(layer, dist.get_rank())
    allreduce_gradients(layer)  # the gradient sync runs across hosts too
    return {**result, "link_tx": sent}


def main(out_dir: str) -> None:
    """Run both dispatch modes on this rank and save the results (see the module docstring)."""
    dist.init_process_group("gloo")
    try:
        world = dist.get_world_size()
        result = {mode: _run(mode, world) for mode in ("flat", "hierarchical")}
        torch.save(result, os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
