"""Kernels: GPU resource use and roofline per declared config, plus CPU timings of the torch references.

GPU timings are ``benchmarks/kernel_gpu.py`` (``--gpu`` here runs it; results from an H200 in RESULTS.md).
On a machine without a GPU this script reports:

1. Per Triton kernel and declared config, compiled ahead of time for sm_80 and sm_90a (``kernels._aot``):
   registers, spills, shared memory, wgmma; and for a representative problem the FLOPs and bytes of one
   call and the roofline time bound on an H100 (~990 dense bf16 TFLOP/s, ~3.35 TB/s HBM3).
2. On this CPU, side by side on the same inputs (median of repeats after warm-up), the torch reference
   (the production CPU path) against what a user would pick instead:
   * grouped_mm (gather -> per-expert GEMM -> gates -> scatter), forward and forward+backward: vs a Python
     loop over experts, and vs ``torch._grouped_mm`` on input gathered beforehand (no gather/scatter/gates:
     a floor, not a competitor);
   * lora_shrink + lora_expand on a mixed-adapter batch read from the paged pool: vs gathering every
     row's A and B padded to the largest rank and two ``bmm`` calls.

    .venv/bin/python benchmarks/kernel_ops.py            # full CPU shapes (about a minute)
    .venv/bin/python benchmarks/kernel_ops.py --smoke    # tiny shapes, seconds (CI smoke)
    python3 benchmarks/kernel_ops.py --gpu --out DIR     # GPU timings instead: runs benchmarks/kernel_gpu.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from kernels import _aot, _grouped_gemm_triton, _lora_triton, grouped_mm, lora_expand, lora_shrink, use_backend

H100_FLOPS, H100_BYTES_PER_S = 990e12, 3.35e12
GROUPED_SHAPES = {  # name: (tokens, top_k, experts, K, N)
    "E8/k2 K512 N1024": (2048, 2, 8, 512, 1024),
    "E64/k8 K512 N256": (1024, 8, 64, 512, 256),
}
LORA_SHAPES = {  # name: (rows, adapters in batch, hidden, ranks cycled over adapters, rows sorted by adapter)
    "decode 64 rows / 32 adapters": (64, 32, 1024, (8, 16, 32, 64), False),
    "prefill 1024 rows / 8 adapters": (1024, 8, 1024, (8, 16, 32, 64), True),
}
SMOKE_GROUPED = {"smoke": (32, 2, 4, 32, 48)}
SMOKE_LORA = {"smoke": (16, 4, 64, (1, 8), False)}
# Representative GPU problems for the roofline (bf16, 2 bytes/element): a Mixtral-8x7B w1 GEMM over 4096
# tokens with top-2 (the fused SwiGLU: w1 and w3 together, N = I); a decode step of 256 rows over 64
# rank-16 adapters at hidden 4096.
GPU_GEMM = dict(rows=8192, experts=8, k=4096, n=14336)
GPU_LORA = dict(rows=256, adapters=64, rank=16, hidden=4096)


def _median_times(fns: dict, warmup: int, repeats: int) -> dict:
    """Median seconds per call of each function, timed round-robin so that the load of a shared machine
    drifting during the run hits every implementation alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


# ------------------------------------------------------------------------------------- GPU, ahead of time
def _gpu_cost(kernel: str) -> tuple[float, float]:
    """FLOPs and HBM bytes of one call of ``kernel`` on its representative problem."""
    s, e, k, n = GPU_GEMM["rows"], GPU_GEMM["experts"], GPU_GEMM["k"], GPU_GEMM["n"]
    t, a, r, h = GPU_LORA["rows"], GPU_LORA["adapters"], GPU_LORA["rank"], GPU_LORA["hidden"]
    costs = {  # every operand read once from HBM and every result written once; indices are negligible
        "grouped_mm_forward": (2 * s * k * n, 2 * (s * k + e * k * n + s * n)),
        "grouped_swiglu_forward": (2 * s * k * 2 * n, 2 * (s * k + e * k * 2 * n + s * n)),  # N = I, weight 2I wide
        "grouped_mm_grad_input": (2 * s * k * n, 2 * (s * n + e * k * n + s * k)),
        "grouped_mm_grad_weight": (2 * s * k * n, 2 * (s * k + s * n + e * k * n)),
        "lora_shrink": (2 * t * h * r, 2 * (t * h + a * r * h + t * r)),
        "lora_expand": (2 * t * r * h, 2 * (t * r + a * r * h + 2 * t * h)),  # y is read and written
    }
    return costs[kernel]


def gpu_static_report() -> dict:
    """Registers/spills/shared memory per kernel config and arch, with the H100 roofline of its problem."""
    reason = _aot.missing_toolchain()
    if reason:
        return {"skipped": reason}
    rows = []
    for case in _grouped_gemm_triton.AOT_CASES + _lora_triton.AOT_CASES:
        flops, nbytes = _gpu_cost(case["name"].split("/")[0])
        bound = max(flops / H100_FLOPS, nbytes / H100_BYTES_PER_S)
        for arch in _aot.ARCHS:
            rows.append({
                **_aot.check_case(case, arch), "flops": flops, "bytes": nbytes,
                "h100_bound_us": bound * 1e6, "h100_bound_by": "compute" if flops / H100_FLOPS > nbytes / H100_BYTES_PER_S else "memory",
            })  # fmt: skip
    return {"problems": {"grouped_mm": GPU_GEMM, "lora": GPU_LORA}, "kernels": rows}


# ------------------------------------------------------------------------------------------ CPU: grouped
def _grouped_inputs(tokens, top_k, experts, k, n, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    x = torch.randn(tokens, k, device=device, dtype=dtype, requires_grad=True)
    w_hf = (torch.randn(experts, n, k, device=device, dtype=dtype) / k**0.5).requires_grad_()  # HF layout [E, N, K]
    choice = torch.rand(tokens, experts, device=device).topk(top_k, dim=1).indices.flatten()
    order = torch.argsort(choice, stable=True)
    offsets = torch.bincount(choice, minlength=experts).cumsum(0)
    gates = torch.rand(tokens * top_k, device=device, dtype=dtype)[order].requires_grad_()
    return x, w_hf, offsets, order // top_k, order, gates


def _loop_over_experts(x, w_hf, offsets, gather, scatter, gates):
    """What a user writes without a grouped GEMM: one matmul per expert on its gathered rows."""
    out = x.new_empty(gather.shape[0], w_hf.shape[1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            rows = x[gather[start:end]] @ w_hf[e].t() * gates[start:end, None]
            out = out.index_copy(0, scatter[start:end], rows)
        start = end
    return out


def bench_grouped(shapes: dict, warmup: int, repeats: int) -> list[dict]:
    results = []
    for name, shape in shapes.items():
        x, w_hf, offsets, gather, scatter, gates = _grouped_inputs(*shape)
        x_grouped = x.detach()[gather].requires_grad_()
        grad = torch.randn(gather.shape[0], w_hf.shape[1])
        impls = {
            "grouped_mm (torch reference)": lambda: grouped_mm(
                x, w_hf.transpose(1, 2), offsets, gather_index=gather, scatter_index=scatter, gates=gates
            ),
            "python loop over experts": lambda: _loop_over_experts(x, w_hf, offsets, gather, scatter, gates),
            "torch._grouped_mm, pre-gathered (floor)": lambda: torch._grouped_mm(
                x_grouped, w_hf.transpose(1, 2), offsets.int()
            ),
        }
        with use_backend("torch"):
            with torch.no_grad():
                seconds = _median_times({f"{impl} fwd": fn for impl, fn in impls.items()}, warmup, repeats)
            seconds |= _median_times(
                {f"{impl} fwd+bwd": (lambda fn=fn: fn().backward(grad)) for impl, fn in impls.items()}, warmup, repeats
            )
        ours = {p: seconds[f"grouped_mm (torch reference) {p}"] for p in ("fwd", "fwd+bwd")}
        results.append({
            "shape": name, "tokens_topk_experts_K_N": shape, "seconds": seconds,
            "grouped_mm_speedup_vs": {k: v / ours[k.rsplit(" ", 1)[1]] for k, v in seconds.items()
                                      if not k.startswith("grouped_mm")},
        })  # fmt: skip
    return results


# --------------------------------------------------------------------------------------------- CPU: LoRA
def _lora_inputs(rows, adapters, hidden, rank_cycle, sorted_rows):
    torch.manual_seed(0)
    ranks = torch.tensor([rank_cycle[a % len(rank_cycle)] for a in range(adapters)])
    max_rank = int(ranks.max())
    pool = torch.randn(2 * int(ranks.sum()) + 1, hidden) * 0.05  # slot width D = hidden: one slot per rank-row
    slots = torch.randperm(pool.shape[0] - 1)
    a_table = torch.full((adapters, max_rank), pool.shape[0] - 1)  # padding names a spare slot
    b_table = a_table.clone()
    used = 0
    for a, r in enumerate(ranks.tolist()):
        a_table[a, :r], b_table[a, :r] = slots[used : used + r], slots[used + r : used + 2 * r]
        used += 2 * r
    pool[-1] = 0  # the padded baseline reads the spare slot for rank-rows past each rank: make them zero
    row_adapter = torch.randint(-1, adapters, (rows,))
    if sorted_rows:
        row_adapter = row_adapter.sort().values
    return torch.randn(rows, hidden), torch.randn(rows, hidden), pool, a_table, b_table, ranks, 1.0 / ranks.float(), row_adapter


def _padded_bmm(x, y, pool, a_table, b_table, scales, row_adapter):
    """The usual fallback: gather each row's A and B padded to the largest rank, then two bmm calls."""
    adapter = row_adapter.clamp(min=0)
    lora_a = pool[a_table[adapter]]  # [T, R, K]
    lora_bt = pool[b_table[adapter]]  # [T, R, N]
    scale = torch.where(row_adapter >= 0, scales[adapter], 0.0)
    v = torch.bmm(lora_a, x.unsqueeze(2))  # [T, R, 1]
    return y + scale[:, None] * torch.bmm(v.transpose(1, 2), lora_bt).squeeze(1)


def bench_lora(shapes: dict, warmup: int, repeats: int) -> list[dict]:
    results = []
    for name, shape in shapes.items():
        x, y, pool, a_table, b_table, ranks, scales, row_adapter = _lora_inputs(*shape)

        def ours():
            v = lora_shrink(x, pool, a_table, ranks, row_adapter)
            return lora_expand(y.clone(), v, pool, b_table, ranks, scales, row_adapter)

        with use_backend("torch"), torch.no_grad():
            torch.testing.assert_close(ours(), _padded_bmm(x, y, pool, a_table, b_table, scales, row_adapter),
                                       atol=1e-3, rtol=1e-3)  # same math, or the timing means nothing
            seconds = _median_times({
                "lora_shrink+expand (torch reference)": ours,
                "gather + bmm padded to max rank": lambda: _padded_bmm(x, y, pool, a_table, b_table, scales, row_adapter),
            }, warmup, repeats)  # fmt: skip
        ours_s = seconds["lora_shrink+expand (torch reference)"]
        results.append({
            "shape": name, "rows_adapters_hidden": shape[:3], "ranks": sorted(set(shape[3])), "seconds": seconds,
            "speedup_vs_padded_bmm": seconds["gather + bmm padded to max rank"] / ours_s,
        })  # fmt: skip
    return results


def main() -> None:
    if "--gpu" in sys.argv[1:]:
        # A process of its own: kernel_gpu.py must choose compiled vs interpreted Triton before any kernel is
        # defined, and this module has defined them already (imports above).
        argv = [sys.executable, str(Path(__file__).with_name("kernel_gpu.py"))]
        os.execv(sys.executable, argv + [a for a in sys.argv[1:] if a != "--gpu"])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="time on CUDA instead (see kernel_gpu.py; --out is a DIR)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, for CI")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    # One thread by default: on these shared 2-core machines, 2 OpenMP threads made torch._grouped_mm 4-8x
    # slower than 1 (barrier waits on a preempted thread), which distorts ratios between implementations.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see comment)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernel_ops.json")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the GPU report compiles the kernels for sm_80/sm_90a")
    torch.set_num_threads(args.threads)
    print("No GPU was lent: there is NO GPU timing. GPU rows are compile-time resource use and roofline bounds.")
    gpu = gpu_static_report()
    for r in gpu.get("kernels", []):
        print(f"{r['name']:28s} {r['arch']:7s} regs={r['registers']:3d} spills={r['spill_store_bytes']}B "
              f"smem={r['shared_bytes'] // 1024}KiB wgmma={str(r['wgmma']):5s} {r['flops'] / 1e9:9.1f} GFLOP "
              f"{r['bytes'] / 1e6:8.1f} MB  H100 bound {r['h100_bound_us']:8.1f} us ({r['h100_bound_by']})")  # fmt: skip
    grouped = bench_grouped(SMOKE_GROUPED if args.smoke else GROUPED_SHAPES, args.warmup, args.repeats)
    lora = bench_lora(SMOKE_LORA if args.smoke else LORA_SHAPES, args.warmup, args.repeats)
    for r in grouped + lora:
        print(f"{r['shape']}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in r["seconds"].items()))
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "repeats": args.repeats, "gpu_timing": "none: no GPU was lent"}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "gpu_static": gpu, "cpu_grouped_mm": grouped, "cpu_lora": lora}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
