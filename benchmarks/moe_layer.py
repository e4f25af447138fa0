"""P1: forward+backward tokens/s of the moeplug-patched MoE block vs transformers' own experts.

Baselines (what a user would otherwise run), all on the same weights, inputs and routing, in one
process: transformers' `eager`, `batched_mm` and `grouped_mm` experts implementations of a
Mixtral sparse MoE block; and the roof: one dense `torch.mm` pair doing the same FLOPs
(tokens*k rows through H -> 2I -> H, forward and backward), i.e. what perfect grouping costs.

    .venv/bin/python benchmarks/moe_layer.py            # full shapes (a few minutes)
    .venv/bin/python benchmarks/moe_layer.py --compiled # also torch.compile'd blocks (inductor) on the small shapes
    .venv/bin/python benchmarks/moe_layer.py --smoke    # tiny shapes, seconds (CI smoke)

Under `--compiled`, transformers' fastest implementation (`grouped_mm`) and the patched block are each
compiled once with their implementation fixed (the patched block with fullgraph=True; transformers' own
compiles with graph breaks allowed) and timed beside the eager ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

import moeplug

SHAPES = {  # name: (experts, top_k, hidden, expert width, tokens)
    "mixtral-like E8/k2": (8, 2, 512, 1024, 2048),
    "fine-grained E64/k8": (64, 8, 512, 128, 2048),
    "demo E8/k2 (make demo-moe block, 8x128 tokens)": (8, 2, 128, 192, 1024),
    "decode-like E8/k2, 64 tokens": (8, 2, 512, 1024, 64),
}
# Shapes small enough to compile (inductor's code generation takes tens of seconds per shape here).
COMPILED_SHAPES = ("demo E8/k2 (make demo-moe block, 8x128 tokens)", "decode-like E8/k2, 64 tokens")
SMOKE_SHAPES = {"smoke E4/k2": (4, 2, 32, 48, 64)}
# batched_mm copies one expert weight per (token, choice): skip it when that copy exceeds this.
BATCHED_MM_LIMIT_BYTES = 8 * 2**30


def _median_times(steps: dict, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per step of each named step function, timed round-robin.

    Interleaving the repeats makes a load spike on this shared machine hit every implementation
    alike instead of skewing whichever ran during it.
    """
    samples = {name: [] for name in steps}
    for round_ in range(warmup + repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if round_ >= warmup:
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def _moe_model(experts: int, top_k: int, hidden: int, width: int) -> transformers.PreTrainedModel:
    config = transformers.MixtralConfig(vocab_size=32, hidden_size=hidden, intermediate_size=width,
                                        num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8,
                                        num_local_experts=experts, num_experts_per_tok=top_k)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config)
    with torch.no_grad():
        for param in model.model.layers[0].mlp.parameters():
            param.normal_(0, 0.02)
    return model.train()


def _block_step(model, impl: str | None, x, grad, compiled: bool = False):
    """One forward + backward of the model's MoE block, with transformers' `impl` (None: as patched).

    `compiled`: the block under torch.compile (inductor), its implementation fixed once (switching it
    per step would recompile); fullgraph for the patched block, graph breaks allowed for transformers'.
    """
    block = model.model.layers[0].mlp
    run = block
    if compiled:
        if impl is not None:
            model.set_experts_implementation(impl)
        run = torch.compile(block, fullgraph=impl is None)

    def step():
        if impl is not None and not compiled:
            model.set_experts_implementation(impl)
        block.zero_grad(set_to_none=True)
        x.grad = None
        run(x).backward(grad)
    return step


def _roof_step(tokens_k: int, hidden: int, width: int):
    """The experts' GEMMs as two dense matmuls (no routing, no activation), forward + backward."""
    a = torch.randn(tokens_k, hidden, requires_grad=True)
    b = torch.randn(tokens_k, width, requires_grad=True)
    w1 = torch.randn(hidden, 2 * width, requires_grad=True)
    w2 = torch.randn(width, hidden, requires_grad=True)
    grads = (torch.randn(tokens_k, 2 * width), torch.randn(tokens_k, hidden))

    def step():
        torch.autograd.backward((a @ w1, b @ w2), grads)
    return step


def run_shape(name: str, experts: int, top_k: int, hidden: int, width: int, tokens: int,
              warmup: int, repeats: int, compiled: bool = False) -> dict:
    """Time every implementation on one shape (and compiled ones if asked); seconds per step and ratios."""
    model = _moe_model(experts, top_k, hidden, width)
    patched = copy.deepcopy(model)
    moeplug.patch_model(patched)
    x = torch.randn(1, tokens, hidden, requires_grad=True)
    grad = torch.randn(1, tokens, hidden)
    steps = {}
    for impl in ("eager", "batched_mm", "grouped_mm"):
        copy_bytes = tokens * top_k * 3 * hidden * width * 4
        if impl == "batched_mm" and copy_bytes > BATCHED_MM_LIMIT_BYTES:
            continue  # would gather ~copy_bytes of expert weights per step (out of memory here)
        steps[impl] = _block_step(model, impl, x, grad)
    steps["moeplug"] = _block_step(patched, None, x, grad)
    if compiled:
        steps["grouped_mm compiled"] = _block_step(copy.deepcopy(model), "grouped_mm", x, grad, compiled=True)
        steps["moeplug compiled"] = _block_step(copy.deepcopy(patched), None, x, grad, compiled=True)
    steps["dense roof"] = _roof_step(tokens * top_k, hidden, width)
    seconds = {"batched_mm": None, **_median_times(steps, warmup, repeats)}
    ours = seconds["moeplug"]
    result = {
        "shape": name, "experts": experts, "top_k": top_k, "hidden": hidden, "width": width, "tokens": tokens,
        "seconds_per_step": seconds,
        "tokens_per_s": {k: (tokens / v if v else None) for k, v in seconds.items()},
        "moeplug_speedup_vs": {k: (v / ours if v else None) for k, v in seconds.items()
                               if k != "moeplug" and "compiled" not in k},
        "fraction_of_roof": seconds["dense roof"] / ours,
    }
    if compiled:
        result["compiled_moeplug_speedup_vs_compiled_grouped_mm"] = (
            seconds["grouped_mm compiled"] / seconds["moeplug compiled"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, for CI")
    parser.add_argument("--compiled", action="store_true",
                        help=f"also time torch.compile'd blocks on {', '.join(COMPILED_SHAPES)}")
    parser.add_argument("--only", nargs="+", choices=list(SHAPES), help="run only these shapes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "moe_layer.json")
    args = parser.parse_args()
    shapes = SMOKE_SHAPES if args.smoke else {n: s for n, s in SHAPES.items() if not args.only or n in args.only}
    results = [run_shape(name, *shape, args.warmup, args.repeats,
                         compiled=args.compiled and (args.smoke or name in COMPILED_SHAPES))
               for name, shape in shapes.items()]
    for r in results:
        times = ", ".join(f"{k} {v * 1e3:.0f} ms" if v else f"{k} skipped" for k, v in r["seconds_per_step"].items())
        print(f"{r['shape']}: {times}; moeplug = {r['fraction_of_roof']:.0%} of roof; speedup "
              + ", ".join(f"{v:.2f}x vs {k}" for k, v in r["moeplug_speedup_vs"].items() if v))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor(), "repeats": args.repeats,
            "command": "python benchmarks/moe_layer.py " + " ".join(sys.argv[1:])}
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
