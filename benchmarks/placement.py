"""P5: expert placement on a trained MoE LM (English + Python), 4 EP ranks, both traffic models.

Trains a small Mixtral-style byte-level LM with per-layer global-batch balancing on the two-domain
corpus of benchmarks/global_balance.py, records routing traces on training text (to plan) and on
held-out text (to evaluate), and compares placements for 4 ranks: contiguous (moeplug's default),
random, greedy (context-coherent and standard affinity), greedy + replicas, and the HiGHS ILP.
Reports per placement, on held-out text: standard-dispatch sends (a token's choices on one rank
count once: what moeplug's deduplicating all-to-all sends), rows a per-(token, choice) dispatch
sends, context-coherent hops (all k x k pairs), and max/mean rank load; a sweep of how many
replicas per layer bring max/mean under 1.1; then, with --measure, the median forward+backward
step time of the 4-process gloo EP model on held-out text and the rows its all-to-alls really
sent, for contiguous vs planned placements, each with the deduplicating dispatch and with the
per-choice one, interleaved step by step (CPU: 2 cores shared by 4 processes -- noisy).

    .venv/bin/python benchmarks/placement.py --abstracts ../shared/data/abstracts.txt --measure
    .venv/bin/python benchmarks/placement.py --load benchmarks/out/placement/model.pt --measure  # no training
    .venv/bin/python benchmarks/placement.py --smoke        # seconds, for CI
    .venv/bin/python benchmarks/placement.py --traces benchmarks/results/placement --ilp-seconds 0 --ilp-nodes 20
                                                            # plans + predicted costs from the committed traces

Reproducible run (no wall-clock limit decides anything: training stops at --steps, the ILP at
--ilp-nodes branch-and-bound nodes, every local search converges or stops at --refine-passes):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/placement.py --abstracts ../shared/data/abstracts.txt \
        --train-minutes 0 --ilp-seconds 0 --ilp-nodes 200 --refine-passes 20 --measure --out DIR

Writes result.json, the traces (fit/held_out .safetensors) and the trained weights (model.pt) to
--out (default benchmarks/out/placement).
"""

from __future__ import annotations

import argparse
import json
import os
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
from moeplug.dispatch import count_traffic, expert_parallel_parameters  # noqa: E402
from moeplug.placement import Placement, RoutingTrace, apply_placement, evaluate, greedy_plan, ilp_plan  # noqa: E402
from moeplug.placement.recipe import collect_trace  # noqa: E402
from lora_serve.testing import free_port

RANKS = 4


def train(args, train_data):
    model = make_model(args, balance="global")
    if args.load is not None:  # a model trained by an earlier run of this script (same model options)
        model.load_state_dict(torch.load(args.load))
        return model.eval(), 0, 0.0
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
        if args.train_minutes > 0 and time.perf_counter() - started > args.train_minutes * 60:
            break  # a wall-clock cap: the step count then depends on the machine (--train-minutes 0: none)
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
    # Seconds make a plan depend on the machine's speed and load; nodes and passes do not (0 s: no clock).
    seconds = args.ilp_seconds if args.ilp_seconds > 0 else None
    refine = dict(refine_seconds=10.0 if seconds else None, refine_passes=args.refine_passes)
    ilp = dict(time_limit=seconds, node_limit=args.ilp_nodes, refine_passes=args.refine_passes)
    return {
        "contiguous": Placement.contiguous(layers, experts, RANKS),
        "random": Placement(random, experts),
        "greedy_coherent": greedy_plan(trace, RANKS, traffic_model="context_coherent", **refine),
        "greedy_standard": greedy_plan(trace, RANKS, traffic_model="standard", **refine),
        "greedy_coherent_tol0.1": greedy_plan(trace, RANKS, traffic_model="context_coherent", tolerance=0.1,
                                              **refine),
        f"greedy_replicas{args.replicas}": greedy_plan(trace, RANKS, replicas=args.replicas,
                                                       traffic_model="context_coherent", **refine),
        "ilp_coherent": ilp_plan(trace, RANKS, "context_coherent", **ilp),
        "ilp_standard": ilp_plan(trace, RANKS, "standard", **ilp),
    }


def _set_dedup(model, dedup: bool) -> None:
    for _, ep in expert_parallel_parameters(model).values():
        ep.dedup = dedup


def _measure_worker(rank, port, args, state_path, slot_tables, ids, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    torch.set_num_threads(1)
    model = make_model(args, balance="global")
    model.load_state_dict(torch.load(state_path))
    moeplug.unpatch_model(model)
    moeplug.patch_model(model.train(), ep_size=RANKS)
    times, rows = {}, {}
    # Step by step, every (placement, dispatch) in turn, so machine load drifts over all of them alike.
    for step_ids in ids[rank]:
        for name, slots in slot_tables.items():
            apply_placement(model, Placement(slots, args.experts))
            for dedup in (True, False):
                _set_dedup(model, dedup)
                key = f"{name}/{'dedup' if dedup else 'per_choice'}"
                dist.barrier()
                with count_traffic() as sent:
                    started = time.perf_counter()
                    model(step_ids, labels=step_ids).loss.backward()
                    elapsed = torch.tensor([time.perf_counter() - started])
                model.zero_grad(set_to_none=True)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step ends when its slowest rank does
                remote = torch.tensor([float(sum(c.sum() - c[r] for r, c in sent))])
                dist.all_reduce(remote)
                times.setdefault(key, []).append(float(elapsed))
                rows.setdefault(key, []).append(float(remote))
    if rank == 0:
        torch.save({"times": times, "rows": rows}, result_path)
    dist.destroy_process_group()


def measure(args, model, chosen: dict[str, Placement], held_out) -> dict:
    """Median step seconds and cross-rank rows per step (all ranks, one direction) per placement/dispatch."""
    state_path, result_path = args.out / "measured_model.pt", args.out / "times.pt"
    torch.save(model.state_dict(), state_path)
    port = free_port()
    tables = {name: plan.slots for name, plan in chosen.items()}
    # Held-out text, a different batch per rank and step (the first step of each warms up).
    steps = batches(held_out, args, 3, (args.measure_steps + 1) * RANKS // len(held_out) + 1)
    ids = [steps[r::RANKS][: args.measure_steps + 1] for r in range(RANKS)]
    # Workers fork from a server that imported torch/transformers/moeplug once (4 fresh interpreters
    # importing them cost ~70 s on a loaded 2-core machine; see tests/launch.py).
    mp.get_context("forkserver").set_forkserver_preload(["torch", "transformers", "moeplug", "global_balance"])
    mp.start_processes(_measure_worker, args=(port, args, str(state_path), tables, ids, str(result_path)),
                       nprocs=RANKS, start_method="forkserver")
    found = torch.load(result_path)
    return {key: {"step_s": statistics.median(t[1:]), "cross_rank_rows_per_step": statistics.mean(found["rows"][key][1:])}
            for key, t in found["times"].items()}


def replica_sweep(fit, test, counts, refine_passes=None) -> dict:
    """Worst-layer max/mean rank load on fit and held-out traces, balance-only greedy, per replica count."""
    sweep = {}
    for replicas in counts:
        plan = greedy_plan(fit, RANKS, replicas=replicas, traffic_model="context_coherent", tolerance=0.0,
                           refine_seconds=None, refine_passes=refine_passes)
        sweep[replicas] = {"fit": float(evaluate(fit, plan)["standard"].max_mean_load.max()),
                           "held_out": float(evaluate(test, plan)["standard"].max_mean_load.max()),
                           "held_out_layer_mean": float(evaluate(test, plan)["standard"].max_mean_load.mean())}
    return sweep


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser, steps=400, micro_batches=2, length=128, layers=6, hidden=96, expert_width=96,
                      coef=0.01)
    parser.add_argument("--train-minutes", type=float, default=12.0,
                        help="stop training after this long (0: no limit, --steps decides: reproducible)")
    parser.add_argument("--load", type=Path, help="model.pt of an earlier run (same model options): skip training")
    parser.add_argument("--trace-batches", type=int, default=16, help="per domain, for planning and for evaluation")
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--replica-sweep", default="0,4,8,12,16", help="replica counts for the balance sweep")
    parser.add_argument("--ilp-seconds", type=float, default=60.0,
                        help="HiGHS time limit (machine-dependent result); 0: none, use --ilp-nodes")
    parser.add_argument("--ilp-nodes", type=int, default=None, help="HiGHS branch-and-bound node limit (reproducible)")
    parser.add_argument("--refine-passes", type=int, default=None, help="cap on local-search passes (None: converge)")
    parser.add_argument("--measure", action="store_true", help="time the 4-process EP model per placement")
    parser.add_argument("--measure-steps", type=int, default=8)
    parser.add_argument("--traces", type=Path, help="plan on DIR/fit.safetensors, evaluate on DIR/held_out.safetensors "
                        "(e.g. the committed benchmarks/results/placement): no training, no --measure")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "placement")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.layers, args.hidden, args.expert_width, args.length, args.batch = 2, 2, 32, 32, 32, 2
        args.trace_batches, args.ilp_seconds, args.measure_steps, args.experts, args.replicas = 1, 1, 1, 8, 4
        args.refine_passes = args.refine_passes or 2
        args.replica_sweep = "0,4"
    if args.traces is not None and args.measure:
        parser.error("--measure needs the trained model; --traces has only the routing traces")
    return args


def _placement_rows(chosen: dict, test: RoutingTrace, hidden: int) -> dict:
    """Predicted held-out traffic and balance of each plan, and its change against the contiguous layout."""
    rows = {}
    for name, plan in chosen.items():
        costs = evaluate(test, plan, row_bytes=hidden * 4, bandwidth=50e9)
        rows[name] = {"standard_sends": costs["standard"].traffic, "coherent_hops": costs["context_coherent"].traffic,
                      "per_choice_rows": costs["standard_rows"].traffic,
                      "max_mean_load": float(costs["standard"].max_mean_load.max()),
                      "max_mean_load_mean": float(costs["standard"].max_mean_load.mean()),
                      "plan_info": {k: v for k, v in plan.info.items() if k != "traffic_model"}}
    base = rows["contiguous"]
    for row in rows.values():
        row["standard_vs_contiguous"] = row["standard_sends"] / base["standard_sends"] - 1
        row["coherent_vs_contiguous"] = row["coherent_hops"] / base["coherent_hops"] - 1
    return rows


def _print_summary(result: dict) -> None:
    print(f"trained {result['train_steps']} steps in {result['train_s']:.0f} s; held-out tokens "
          f"{result['held_out_tokens']}; affinity {result['affinity_held_out']}")
    print(f"{'placement':<24} {'std sends':>10} {'vs contig':>9} {'coh hops':>10} {'vs contig':>9} {'max/mean':>8}")
    for name, row in result["placements"].items():
        print(f"{name:<24} {row['standard_sends']:>10.0f} {row['standard_vs_contiguous']:>+9.1%} "
              f"{row['coherent_hops']:>10.0f} {row['coherent_vs_contiguous']:>+9.1%} {row['max_mean_load']:>8.3f}")
    print("replicas per layer -> worst-layer max/mean (fit, held-out):",
          {r: (round(v["fit"], 3), round(v["held_out"], 3)) for r, v in result["replica_sweep"].items()})
    for key, found in result.get("measured", {}).items():
        print(f"{key:<36} step {found['step_s']:.3f} s  cross-rank rows/step {found['cross_rank_rows_per_step']:.0f}")


def main() -> None:
    args = _parse_args()
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.traces is not None:  # the planning half of P5 from recorded traces: needs neither model nor corpus
        model, steps, seconds = None, 0, 0.0
        fit = RoutingTrace.load(args.traces / "fit.safetensors")
        test = RoutingTrace.load(args.traces / "held_out.safetensors")
    else:
        train_data, held_out = split_domains(args.abstracts)
        model, steps, seconds = train(args, train_data)
        fit = collect_trace(model, batches(train_data, args, 1, args.trace_batches))
        test = collect_trace(model, batches(held_out, args, 2, args.trace_batches))
        fit.save(args.out / "fit.safetensors")
        test.save(args.out / "held_out.safetensors")
    chosen = plans(fit, args)
    sweep = replica_sweep(fit, test, [int(v) for v in args.replica_sweep.split(",")], args.refine_passes)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "train_steps": steps, "train_s": seconds,
              "held_out_tokens": test.tokens, "affinity_fit": affinity_stats(fit), "affinity_held_out": affinity_stats(test),
              "placements": _placement_rows(chosen, test, args.hidden), "replica_sweep": sweep}
    if args.load is None and model is not None:
        torch.save(model.state_dict(), args.out / "model.pt")
    if args.measure:
        measured = ["contiguous", "greedy_coherent", f"greedy_replicas{args.replicas}", "ilp_standard"]
        result["measured"] = measure(args, model, {name: chosen[name] for name in measured}, held_out)
    (args.out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    _print_summary(result)


if __name__ == "__main__":
    main()
