"""torchrun worker of benchmarks/multihost.py: replayed P5 routing through moeplug's EP dispatch across hosts.

    python -m tests.multihost.harness --hosts 2 --procs 2 -- benchmarks/multihost_worker.py PLAN_DIR TOKENS HIDDEN REPEATS

Every rank draws TOKENS tokens per MoE layer whose top-2 choices follow the held-out trace's pair counts
(a token's source rank is independent of its experts, as under data parallelism), then for each plan in
PLAN_DIR (*.json, `Placement`) and each dispatch (flat, hierarchical) runs forward + backward of the six
layers chained (a residual stream of width HIDDEN; each expert a per-slot scale, so the exchange is the
cost), interleaved over REPEATS rounds. Per config it records: bytes sent by this host's link per step
(local rank 0 reads them between barriers), step seconds, and from one counted step
(`count_traffic(assignments=True)`) the rows sent to ranks on other hosts and the expert work sent to each rank per layer.
Writes PLAN_DIR/rank{r}.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from moeplug.dispatch import count_traffic, expert_parallel_forward
from moeplug.ep_layout import ExpertParallel, node_layout
from moeplug.placement import Placement, RoutingTrace
from tests.multihost.harness import link_bytes

HELD_OUT = Path(__file__).parent / "results" / "placement" / "held_out.safetensors"


def draw_choices(trace: RoutingTrace, tokens: int, seed: int) -> list[torch.Tensor]:
    """Per layer [tokens, 2] distinct expert pairs drawn with the trace's pair frequencies."""
    generator = torch.Generator().manual_seed(seed)
    experts, drawn = trace.num_experts, []
    for together in trace.pairs:
        weights = torch.triu(together, diagonal=1).flatten()
        index = torch.multinomial(weights, tokens, replacement=True, generator=generator)
        drawn.append(torch.stack([index // experts, index % experts], 1))
    return drawn


def _layouts(plan: Placement, mode: str, world: int, rank: int) -> list[ExpertParallel]:
    contiguous = plan.info.get("planner") == "contiguous"
    return [ExpertParallel(world, rank, plan.num_experts, dist.group.WORLD, slots=None if contiguous else plan.slots[layer],
                           ranks_per_node=node_layout(), hierarchical=mode == "hierarchical")
            for layer in range(plan.num_layers)]


def _step(layouts, choices, gates, hidden: torch.Tensor, scales) -> None:
    x = hidden.clone().requires_grad_(True)
    for ep, index, gate, scale in zip(layouts, choices, gates, scales):
        x = x + expert_parallel_forward(x, index, gate, lambda rows, ids, s=scale: rows * s[ids], ep)
    x.square().mean().backward()


def _inter_rows(entries: list[tuple], rank: int, per_node: int) -> int:
    """Rows this rank sent to ranks on other hosts, over every hop recorded."""
    return sum(int(rows[dest]) for _, rows, _ in entries for dest in range(len(rows))
               if dest // per_node != rank // per_node)


def run(plan_dir: Path, tokens: int, hidden: int, repeats: int) -> None:
    """Measure every (plan, dispatch) config on this rank (see the module docstring)."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per_node, reader = node_layout() or world, int(os.environ["LOCAL_RANK"]) == 0
    trace = RoutingTrace.load(HELD_OUT)
    choices = draw_choices(trace, tokens, seed=1000 + rank)
    gates = [torch.softmax(torch.randn(tokens, 2), -1) for _ in choices]
    x = torch.randn(tokens, hidden)
    configs = {}
    for path in sorted(plan_dir.glob("*.json")):
        plan = Placement.load(path)
        scales = [torch.rand(plan.slots_per_rank, hidden, requires_grad=True) for _ in choices]
        for mode in ("flat", "hierarchical"):
            layouts = _layouts(plan, mode, world, rank)
            with count_traffic(assignments=True) as entries:
                _step(layouts, choices, gates, x, scales)
            # Expert work this rank sent per layer and destination (hierarchical: the second hop's entries).
            hops = 2 if mode == "hierarchical" else 1
            work = [w.tolist() for _, _, w in entries[hops - 1::hops]]
            configs[f"{path.stem}/{mode}"] = {"layouts": layouts, "scales": scales, "bytes": [], "seconds": [],
                                              "inter_rows": _inter_rows(entries, rank, per_node), "work": work}
    for _ in range(repeats):  # interleaved, so load drifts hit every config alike
        for config in configs.values():
            dist.barrier()
            before, started = link_bytes()["tx"], time.perf_counter()
            _step(config["layouts"], choices, gates, x, config["scales"])
            dist.barrier()
            config["seconds"].append(time.perf_counter() - started)
            config["bytes"].append(link_bytes()["tx"] - before if reader else 0)
    out = {name: {"link_tx_bytes": statistics.median(c["bytes"]), "step_s": statistics.median(c["seconds"]),
                  "inter_rows": c["inter_rows"], "work": c["work"]} for name, c in configs.items()}
    (plan_dir / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    run(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
