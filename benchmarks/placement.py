"""P5: expert placement on a trained MoE LM (English + Python), 4 EP ranks, both traffic models.

Trains a small Mixtral-style byte-level LM with per-layer global-batch balancing on the two-domain
corpus of benchmarks/global_balance.py, records routing traces on training text (to plan) and on
held-out text (to evaluate), and compares placements for 4 ranks: contiguous (moeplug's default),
random, greedy (context-coherent and standard affinity), greedy + replicas, and the HiGHS ILP.
Reports per placement, on held-out text: standard-dispatch sends (a token's choices on one rank
count once), context-coherent hops (all k x k pairs), rows moeplug's all-to-all sends, and max/mean
rank load; then, with --measure, the median forward+backward step time of the 4-process gloo EP
model under contiguous vs the planned placements (CPU: 2 cores shared by 4 processes -- noisy).

    .venv/bin/python benchmarks/placement.py --abstracts ../shared/data/abstracts.txt --measure
    .venv/bin/python benchmarks/placement.py --smoke        # a minute or two, for CI

Writes result.json (and the trained weights, model.pt) to --out (default benchmarks/out/placement).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from global_balance import add_training_args, make_model, split_domains, windows  # noqa: E402

import moeplug  # noqa: E402
from moeplug import BalanceController  # noqa: E402
from moeplug.placement import Placement, apply_placement, evaluate, greedy_plan, ilp_plan  # noqa: E402
from moeplug.placement.recipe import collect_trace  # noqa: E402

RANKS = 4


def train(args, train_data):
    model = make_model(args, balance="global")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    BalanceController(model, optimizer)
    generator = torch.Generator().manual_seed(args.seed)
    domains = list(train_data)
    started = time.perf_counter()
    for step in range(args.steps):
        for micro in range(args.micro_batches):
            ids = windows(train_data[domains[micro % len(domains)]], args.batch, args.length, generator)
            (model(ids, labels=ids).loss / args.micro_batches).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if time.perf_counter() - started > args.train_minutes * 60:
            break
    return model.eval(), step + 1, time.perf_counter() - started


def batches(data, args, seed, count):
    generator = torch.Generator().manual_seed(seed)
    return [windows(data[name], args.batch, args.length, generator) for _ in range(count) for name in data]


def affinity_stats(trace) -> dict:
    """How concentrated layer-to-layer routing is: P(next expert | expert), averaged over experts."""
    moves = trace.transitions
    conditional = moves / moves.sum(-1, keepdim=True).clamp_min(1)
    top = conditional.sort(-1, descending=True).values
    per_rank = trace.num_experts // RANKS
    load = trace.counts / trace.counts.sum(-1, keepdim=True)
    return {"mean_top1_next_prob": float(top[..., 0].mean()),
            f"mean_top{per_rank}_next_prob": float(top[..., :per_rank].sum(-1).mean()),
            "uniform_top1_next_prob": 1 / trace.num_experts,
            "max_expert_share_per_layer": [round(float(v), 3) for v in load.max(-1).values]}


def plans(trace, args) -> dict[str, Placement]:
    layers, experts = trace.num_layers, trace.num_experts
    generator = torch.Generator().manual_seed(0)
    random = torch.stack([torch.randperm(experts, generator=generator).view(RANKS, -1) for _ in range(layers)])
    return {
        "contiguous": Placement.contiguous(layers, experts, RANKS),
        "random": Placement(random, experts),
        "greedy_coherent": greedy_plan(trace, RANKS, traffic_model="context_coherent"),
        "greedy_standard": greedy_plan(trace, RANKS, traffic_model="standard"),
        f"greedy_replicas{args.replicas}": greedy_plan(trace, RANKS, replicas=args.replicas,
                                                       traffic_model="context_coherent"),
        "ilp_coherent": ilp_plan(trace, RANKS, "context_coherent", time_limit=args.ilp_seconds),
        "ilp_standard": ilp_plan(trace, RANKS, "standard", time_limit=args.ilp_seconds),
    }


def _measure_worker(rank, port, args, state_path, slot_tables, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    torch.set_num_threads(1)
    model = make_model(args, balance="global")
    model.load_state_dict(torch.load(state_path))
    moeplug.unpatch_model(model)
    moeplug.patch_model(model.train(), ep_size=RANKS)
    generator = torch.Generator().manual_seed(100 + rank)
    ids = [torch.randint(0, 256, (args.batch, args.length), generator=generator) for _ in range(args.measure_steps)]
    times = {}
    for name, slots in slot_tables.items():  # interleaved rounds so machine load hits all alike
        apply_placement(model, Placement(slots, args.experts))
        for step_ids in ids:
            dist.barrier()
            started = time.perf_counter()
            model(step_ids, labels=step_ids).loss.backward()
            model.zero_grad(set_to_none=True)
            elapsed = torch.tensor([time.perf_counter() - started])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times.setdefault(name, []).append(float(elapsed))
    if rank == 0:
        torch.save(times, result_path)
    dist.destroy_process_group()


def measure(args, model, chosen: dict[str, Placement]) -> dict:
    state_path, result_path = args.out / "model.pt", args.out / "times.pt"
    torch.save(model.state_dict(), state_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tables = {name: plan.slots for name, plan in chosen.items()}
    mp.spawn(_measure_worker, args=(port, args, str(state_path), tables, str(result_path)), nprocs=RANKS)
    times = torch.load(result_path)
    return {name: statistics.median(t[1:]) for name, t in times.items()}  # first step warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser, steps=400, micro_batches=2, length=128, layers=6, hidden=96, expert_width=96,
                      coef=0.01)
    parser.add_argument("--train-minutes", type=float, default=12.0, help="stop training after this long")
    parser.add_argument("--trace-batches", type=int, default=16, help="per domain, for planning and for evaluation")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--ilp-seconds", type=float, default=60.0)
    parser.add_argument("--measure", action="store_true", help="time the 4-process EP model per placement")
    parser.add_argument("--measure-steps", type=int, default=6)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "placement")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.layers, args.hidden, args.expert_width, args.length = 2, 2, 32, 32, 32
        args.trace_batches, args.ilp_seconds, args.measure_steps, args.experts = 1, 2, 2, 8
    torch.manual_seed(args.seed)
    train_data, held_out = split_domains(args.abstracts)
    model, steps, seconds = train(args, train_data)
    fit = collect_trace(model, batches(train_data, args, 1, args.trace_batches))
    test = collect_trace(model, batches(held_out, args, 2, args.trace_batches))
    chosen = plans(fit, args)
    row_bytes = args.hidden * 4
    rows = {}
    for name, plan in chosen.items():
        costs = evaluate(test, plan, row_bytes=row_bytes, bandwidth=50e9)
        rows[name] = {"standard_sends": costs["standard"].traffic, "coherent_hops": costs["context_coherent"].traffic,
                      "moeplug_rows": costs["standard_rows"].traffic,
                      "max_mean_load": float(costs["standard"].max_mean_load.max()),
                      "max_mean_load_mean": float(costs["standard"].max_mean_load.mean()),
                      "plan_info": {k: v for k, v in plan.info.items() if k != "traffic_model"}}
    base = rows["contiguous"]
    for row in rows.values():
        row["standard_vs_contiguous"] = row["standard_sends"] / base["standard_sends"] - 1
        row["coherent_vs_contiguous"] = row["coherent_hops"] / base["coherent_hops"] - 1
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "train_steps": steps, "train_s": seconds,
              "held_out_tokens": test.tokens, "affinity_fit": affinity_stats(fit), "affinity_held_out": affinity_stats(test),
              "placements": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.measure:
        result["step_s"] = measure(args, model, chosen)
    (args.out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"trained {steps} steps in {seconds:.0f} s; held-out tokens {test.tokens}; affinity {result['affinity_held_out']}")
    print(f"{'placement':<20} {'std sends':>10} {'vs contig':>9} {'coh hops':>10} {'vs contig':>9} {'max/mean':>8}"
          f"{' step s' if args.measure else ''}")
    for name, row in rows.items():
        step = f" {result['step_s'][name]:.3f}" if args.measure else ""
        print(f"{name:<20} {row['standard_sends']:>10.0f} {row['standard_vs_contiguous']:>+9.1%} "
              f"{row['coherent_hops']:>10.0f} {row['coherent_vs_contiguous']:>+9.1%} {row['max_mean_load']:>8.3f}{step}")


if __name__ == "__main__":
    main()
