"""The `python -m moeplug.placement` command: trace -> plan -> apply -> report, on a tiny model or a saved one.

    python -m moeplug.placement --ep-size 2 --nproc 2                  # tiny Mixtral, 2 gloo processes
    torchrun --nproc-per-node 4 -m moeplug.placement --model DIR --ep-size 4 --planner ilp --out plan/

Token ids are random (seeded) unless `--tokens FILE.pt` gives a [N, seq] LongTensor; each rank
takes its own rows, the first `--batches` per rank for tracing, the next ones held out for measuring.
Writes the report (JSON) to stdout and, with --out, `placement.json`, `trace.safetensors`, `report.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .recipe import PLANNERS, collect_trace, run_recipe


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moeplug.placement", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a transformers MoE checkpoint directory (default: moeplug.tiny mixtral)")
    parser.add_argument("--tiny", default="mixtral", help="tiny family when --model is not given")
    parser.add_argument("--ep-size", type=int, required=True)
    parser.add_argument("--nproc", type=int, default=0, help="spawn this many gloo processes (not under torchrun)")
    parser.add_argument("--tokens", help="a torch.save'd [N, seq] LongTensor of token ids")
    parser.add_argument("--batches", type=int, default=4, help="trace batches per rank (as many held out)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--planner", choices=PLANNERS, default="greedy")
    parser.add_argument("--replicas", type=int, default=0,
                        help="extra expert copies per layer (greedy; ilp with --traffic-model standard)")
    parser.add_argument("--traffic-model", choices=("context_coherent", "standard"), default="context_coherent")
    parser.add_argument("--time-limit", type=float, default=30.0, help="ILP time limit, seconds")
    parser.add_argument("--bandwidth", type=float, default=50e9, help="bytes/s per rank for predicted times")
    parser.add_argument("--out", help="directory for the plan, trace and report")
    return parser


def _model(args):
    import transformers

    import moeplug
    from moeplug.tiny import tiny_model

    model = (transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32) if args.model
             else tiny_model(args.tiny))
    moeplug.patch_model(model.train(), ep_size=args.ep_size)
    return model


def _batches(args, vocab: int, rank: int, world: int) -> list[torch.Tensor]:
    count = 2 * args.batches * args.batch_size
    if args.tokens:
        rows = torch.load(args.tokens)[rank::world][:count]
        if len(rows) < count:
            raise ValueError(f"{args.tokens} has {len(rows)} rows for rank {rank}, need {count}")
    else:
        rows = torch.randint(3, vocab, (count, args.seq), generator=torch.Generator().manual_seed(rank))
    return list(rows.split(args.batch_size))


def main_worker(args) -> None:
    """One rank of the recipe (process group initialised)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model(args)
    batches = _batches(args, model.config.vocab_size, rank, world)
    plan, report = run_recipe(model, batches[: args.batches], batches[args.batches:], args.ep_size, args.planner,
                              args.replicas, args.traffic_model, args.time_limit,
                              bandwidth=args.bandwidth)
    if rank == 0:
        print(json.dumps(report, indent=1))
    if args.out:
        trace = collect_trace(model, batches[: args.batches])  # collective: every rank runs it
        if rank == 0:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            plan.save(out / "placement.json")
            trace.save(out / "trace.safetensors")
            (out / "report.json").write_text(json.dumps(report, indent=1))


def _spawned(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        main_worker(args)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """Entry point: spawn `--nproc` gloo ranks, or join the torchrun-launched group."""
    args = _parser().parse_args(argv)
    if args.nproc:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(_spawned, args=(args.nproc, port, args), nprocs=args.nproc, join=True)
        return
    if "RANK" not in os.environ:
        raise SystemExit("launch with torchrun (or pass --nproc N to spawn N local gloo processes)")
    dist.init_process_group("gloo")
    try:
        main_worker(args)
    finally:
        dist.destroy_process_group()

