"""torchrun worker: a few EP training steps of the tiny Mixtral, a checkpoint after each, a fault on demand.

    python -m tests.multihost.harness --hosts 2 --procs 2 -- tests/multihost/train_worker.py OUT STEPS [--die-at S]
    python -m tests.multihost.harness --hosts 4 --procs 1 -- tests/multihost/train_worker.py OUT STEPS --resume

EP spans every rank; SGD with momentum (its state is in the checkpoint). After each step the mean loss
over ranks is appended to OUT/losses.json and `moeplug.checkpoint.save_checkpoint` writes OUT/ckpt.
`--die-at S`: the last rank kills itself (SIGKILL) in the middle of step S, after its forward; the
others then fail inside the backward's all-to-all, print one line saying so and exit 1, within the
process group's timeout (`--timeout`, seconds) at worst. `--resume` continues from OUT/ckpt, on any
number of hosts with the same EP size.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import moeplug
from moeplug.checkpoint import load_checkpoint, save_checkpoint
from moeplug.dispatch import allreduce_gradients
from moeplug.tiny import tiny_model


def _step(model, optimizer, step: int, rank: int, die: bool) -> float:
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(100 * step + rank))
    loss = model(ids, labels=ids).loss
    if die:
        os.kill(os.getpid(), signal.SIGKILL)  # mid-step: the other ranks are about to exchange with this one
    loss.backward()
    allreduce_gradients(model)
    optimizer.step()
    optimizer.zero_grad()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return float(mean) / dist.get_world_size()


def main(argv=None) -> None:
    """Train (or resume) and record losses (see the module docstring)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("steps", type=int)
    parser.add_argument("--die-at", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.out)
    model = tiny_model("mixtral", num_local_experts=8).train()
    moeplug.patch_model(model, ep_size=world)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = json.loads((out / "losses.json").read_text()) if args.resume else []
    if args.resume:
        load_checkpoint(model, out / "ckpt", optimizer)
    step = len(losses)
    try:
        for step in range(len(losses), args.steps):
            losses.append(_step(model, optimizer, step, rank, die=step == args.die_at and rank == world - 1))
            save_checkpoint(model, out / "ckpt", optimizer)
            if rank == 0:
                (out / "losses.json").write_text(json.dumps(losses))
    except RuntimeError as error:  # gloo: a peer closed its connections, or the timeout passed
        print(f"rank {rank}: training step {step} failed, a rank of the job is gone: {error}".splitlines()[0],
              flush=True)
        raise SystemExit(1) from None
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
