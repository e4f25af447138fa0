"""Issue 3: expert-parallel MoE layer, forward+backward time split into dispatch / experts / combine.

moeplug's `MoELayer(ep_size=P)` against DeepSpeed's `deepspeed.moe.layer.MoE(ep_size=P)` (the layer
DeepSpeed users would pick), at P = 2 and 4 gloo ranks with one thread each, on the same weights,
tokens and routing (top-k softmax gate, renormalised; DeepSpeed set dropless: `drop_tokens=False`,
no second-expert sampling, no random token selection, no noise). Outputs, input gradients and
router and expert weight gradients are checked equal before timing (max differences in the JSON). Steps alternate between the two layers (ABAB..., first one swapped each round).

How a step is split: identity autograd functions stamp `time.perf_counter()` when the forward
reaches them and when their gradient arrives in backward, at four points: the layer input, the
experts' input (rows received by this rank's experts, after the first all-to-all), the experts'
output and the layer output. So
  dispatch = routing (gate, top-k, permutation, count exchange) + first all-to-all, and its backward;
  experts  = this rank's expert MLPs, forward and backward;
  combine  = second all-to-all + gate weighting + un-permutation, and its backward.
Waiting for a slower rank shows up in the phase holding the collective (dispatch or combine).
Phase times are averaged over ranks; the step time is the slowest rank's; medians over steps.

    .venv/bin/python benchmarks/expert_parallel.py              # 2 and 4 ranks, default shapes
    .venv/bin/python benchmarks/expert_parallel.py --smoke      # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp
from tqdm import tqdm
from lora_serve.testing import free_port

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("dispatch", "experts", "combine")
POINTS = ("layer_in", "experts_in", "experts_out", "layer_out")


class _Stamp(torch.autograd.Function):
    """Identity that records when the forward passes it and when its gradient arrives."""

    @staticmethod
    def forward(ctx, x, name, stamps):
        if isinstance(x, funcol.AsyncCollectiveTensor):
            x = x.wait()  # the all-to-all must have finished for the stamp to mean "arrived"
        stamps[f"{name}_fwd"] = time.perf_counter()
        ctx.name, ctx.stamps = name, stamps
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if isinstance(grad, funcol.AsyncCollectiveTensor):
            grad = grad.wait()
        ctx.stamps[f"{ctx.name}_bwd"] = time.perf_counter()
        return grad, None, None


def _phases(stamps: dict) -> dict[str, float]:
    """Seconds per phase (forward + backward) and the two directions separately."""
    fwd = [stamps[f"{p}_fwd"] for p in POINTS]
    bwd = [stamps[f"{p}_bwd"] for p in reversed(POINTS)]  # gradients arrive output first
    out = {}
    for i, phase in enumerate(PHASES):
        out[f"{phase}_fwd"] = fwd[i + 1] - fwd[i]
        out[f"{phase}_bwd"] = bwd[len(PHASES) - i] - bwd[len(PHASES) - i - 1]
        out[phase] = out[f"{phase}_fwd"] + out[f"{phase}_bwd"]
    return out


def _layers(args, ep_size: int, stamps: dict):
    """The two layers with identical weights, each stamping its experts' input and output."""
    import moeplug.experts
    from deepspeed.moe.layer import MoE

    from moeplug import MoEConfig, MoELayer
    from moeplug.integrations.deepspeed import use_deepspeed_groups
    from moeplug.layer import SwiGLUMLP

    use_deepspeed_groups(ep_size)  # one set of EP groups for both layers
    experts, hidden, width = args.experts, args.hidden, args.intermediate
    generator = torch.Generator().manual_seed(0)
    router = torch.randn(experts, hidden, generator=generator) / hidden**0.5
    gate_up = torch.randn(experts, 2 * width, hidden, generator=generator) / hidden**0.5
    down = torch.randn(experts, hidden, width, generator=generator) / width**0.5

    ours = MoELayer(MoEConfig(num_experts=experts, top_k=args.top_k, hidden_size=hidden, intermediate_size=width,
                              ep_size=ep_size, balance="none", renormalize=args.top_k > 1))
    local = ours.moeplug.ep.local_experts
    with torch.no_grad():
        ours.router.weight.copy_(router)
        ours.experts.gate_up_proj.copy_(gate_up[local.start:local.stop])
        ours.experts.down_proj.copy_(down[local.start:local.stop])
    # moeplug's dispatch takes the local-experts function as an argument: wrap it with stamps.
    dispatch = moeplug.experts.expert_parallel_forward

    def stamped_dispatch(hidden_states, index, weights, local_experts, ep):
        def stamped(rows, ids):
            out = local_experts(_Stamp.apply(rows, "experts_in", stamps), ids)
            return _Stamp.apply(out, "experts_out", stamps)
        return dispatch(hidden_states, index, weights, stamped, ep)

    moeplug.experts.expert_parallel_forward = stamped_dispatch

    theirs = MoE(hidden, SwiGLUMLP(hidden, width), num_experts=experts, ep_size=ep_size, k=args.top_k,
                 min_capacity=0, drop_tokens=False, use_rts=False, noisy_gate_policy=None,
                 top2_2nd_expert_sampling=False)
    theirs.set_deepspeed_parallelism()  # what deepspeed.initialize would do: attach the EP group
    ds_experts = theirs.deepspeed_moe.experts
    with torch.no_grad():
        theirs.deepspeed_moe.gate.wg.weight.copy_(router)
        for i, expert in enumerate(ds_experts.deepspeed_experts):
            gate, up = gate_up[local.start + i].chunk(2)
            expert.gate_proj.weight.copy_(gate)
            expert.up_proj.weight.copy_(up)
            expert.down_proj.weight.copy_(down[local.start + i])
    experts_forward = ds_experts.forward
    ds_experts.forward = lambda x: _Stamp.apply(experts_forward(_Stamp.apply(x, "experts_in", stamps)),
                                                "experts_out", stamps)
    return ours, theirs


def _max_differences(ours, theirs, x: torch.Tensor, grad: torch.Tensor) -> dict[str, float]:
    """Largest |moeplug - DeepSpeed| over ranks of the output, input gradient and weight gradients."""
    results = []
    for forward in (ours, lambda inp: theirs(inp)[0]):
        inp = x.detach().requires_grad_(True)
        out = forward(inp)
        out.backward(grad)
        results.append((out.detach(), inp.grad))
    ds_experts = theirs.deepspeed_moe.experts.deepspeed_experts
    pairs = {
        "output": (results[0][0], results[1][0]),
        "input_grad": (results[0][1], results[1][1]),
        "router_grad": (ours.router.weight.grad, theirs.deepspeed_moe.gate.wg.weight.grad),
        "gate_up_grad": (ours.experts.gate_up_proj.grad,
                         torch.stack([torch.cat([e.gate_proj.weight.grad, e.up_proj.weight.grad]) for e in ds_experts])),
        "down_grad": (ours.experts.down_proj.grad, torch.stack([e.down_proj.weight.grad for e in ds_experts])),
    }
    diffs = torch.stack([(a - b).abs().max() for a, b in pairs.values()])
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
    ours.zero_grad(set_to_none=True)
    theirs.zero_grad(set_to_none=True)
    return dict(zip(pairs, diffs.tolist()))


def _load(ours, x: torch.Tensor, args) -> dict[str, float]:
    """Routing load and rows per rank. Dropless DeepSpeed pads every expert to the busiest (expert,
    rank) count C: it computes and sends E * C rows per rank. moeplug computes tokens * k rows and
    sends each token once per destination rank (measured with `count_traffic`)."""
    from moeplug.dispatch import count_traffic

    with torch.no_grad(), count_traffic() as traffic:
        ours(x)
    counts = ours.stats.tokens_per_expert.clone()
    capacity = counts.max().clone()
    sent = torch.stack([rows.sum() for _, rows in traffic]).sum().float()
    dist.all_reduce(counts)
    dist.all_reduce(capacity, op=dist.ReduceOp.MAX)
    dist.all_reduce(sent)
    ds_rows = args.experts * capacity.item()
    return {"max_over_mean": (counts.max() / counts.float().mean()).item(),
            "expert_rows_deepspeed_over_moeplug": ds_rows / (args.tokens * args.top_k),
            "sent_rows_deepspeed_over_moeplug": ds_rows / (sent.item() / dist.get_world_size())}


def _step(layer, x: torch.Tensor, grad: torch.Tensor, stamps: dict) -> dict[str, float]:
    stamps.clear()
    dist.barrier()
    start = time.perf_counter()
    inp = x.detach().requires_grad_(True)
    out = _Stamp.apply(layer(_Stamp.apply(inp, "layer_in", stamps)), "layer_out", stamps)
    out.backward(grad)
    total = torch.tensor(time.perf_counter() - start)
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    phases = _phases(stamps)
    values = torch.tensor([phases[k] for k in sorted(phases)])
    dist.all_reduce(values)
    return {"step": total.item(), **dict(zip(sorted(phases), (values / dist.get_world_size()).tolist()))}


def _worker(rank: int, port: int, world: int, args, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    stamps: dict = {}
    ours, theirs = _layers(args, world, stamps)
    generator = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(args.tokens, args.hidden, generator=generator)
    grad = torch.randn(args.tokens, args.hidden, generator=generator)
    # A direction shared by all tokens (same on every rank) gives each expert a fixed logit offset
    # of about skew * N(0, 1): uneven loads, as in trained routers.
    x += args.skew * torch.randn(args.hidden, generator=torch.Generator().manual_seed(1))
    diffs = _max_differences(ours, theirs, x, grad)
    if max(diffs.values()) > 1e-3:  # fp32 sums of up to `tokens` terms in another order
        raise RuntimeError(f"the two layers disagree ({diffs}): the comparison would be meaningless")
    layers = {"moeplug": ours, "deepspeed": lambda inp: theirs(inp)[0]}
    load = _load(ours, x, args)
    samples = {name: [] for name in layers}
    rounds = range(args.warmup + args.repeats)
    for round_ in tqdm(rounds, desc=f"{world} ranks", disable=rank != 0):
        names = list(layers) if round_ % 2 == 0 else list(reversed(layers))
        for name in names:
            result = _step(layers[name], x, grad, stamps)
            if round_ >= args.warmup:
                samples[name].append(result)
    if rank == 0:
        medians = {name: {key: statistics.median(s[key] for s in runs) for key in runs[0]}
                   for name, runs in samples.items()}
        Path(path).write_text(json.dumps({"ranks": world, "max_abs_differences": diffs, "load": load,
                                          "medians_s": medians, "samples": samples}))
    dist.barrier()
    dist.destroy_process_group()


def _table(results: list[dict]) -> str:
    lines = ["| ranks | phase | moeplug ms | DeepSpeed MoE ms | DeepSpeed / moeplug |", "|---|---|---|---|---|"]
    for result in results:
        ours, theirs = result["medians_s"]["moeplug"], result["medians_s"]["deepspeed"]
        load = result["load"]
        lines.append(f"| {result['ranks']} | load max/mean {load['max_over_mean']:.2f}; DeepSpeed/moeplug rows: "
                     f"computed {load['expert_rows_deepspeed_over_moeplug']:.2f}x, "
                     f"sent {load['sent_rows_deepspeed_over_moeplug']:.2f}x | | | |")
        for key in (*PHASES, "step"):
            lines.append(f"| {result['ranks']} | {key} | {ours[key] * 1e3:.1f} | {theirs[key] * 1e3:.1f} | "
                         f"{theirs[key] / ours[key]:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--skew", type=float, default=0.0,
                        help="shared offset added to every token (0: even expert loads; 0.5: busiest expert ~2x the mean)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and 2 repeats (seconds)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "expert_parallel.json"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.tokens, args.hidden, args.intermediate, args.experts, args.warmup, args.repeats = 64, 32, 48, 4, 1, 2
    results = []
    for world in args.ranks:
        path = f"{args.output}.{world}.part"
        mp.spawn(_worker, args=(free_port(), world, args, path), nprocs=world, join=True)
        results.append(json.loads(Path(path).read_text()))
        os.remove(path)
    summary = {"command": "benchmarks/expert_parallel.py", "args": vars(args), "load_avg": os.getloadavg(),
               "cpus": os.cpu_count(), "threads_per_rank": 1, "results": results}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(summary, indent=1))
    print(_table(results))
    print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs, 1 thread per rank -> {args.output}")


if __name__ == "__main__":
    main()
