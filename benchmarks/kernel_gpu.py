"""Kernels on a GPU: each Triton op against what a user would run instead, side by side, one process.

    python3 benchmarks/kernel_gpu.py --out DIR           # CUDA: bf16 (+ fp32 at small shapes), ~1 min on an H100
    python3 benchmarks/kernel_gpu.py --smoke --out DIR   # no GPU: tiny shapes in Triton's interpreter, CPU timer
    (``benchmarks/kernel_ops.py --gpu ...`` runs this script too.)

Rows, on the same inputs (bf16 unless marked fp32):

* ``grouped_mm`` (gather + per-expert GEMM + gates + scatter), forward and forward+backward, at the CPU
  benchmark's shapes, a Mixtral-8x7B w1 GEMM (kernel_ops.GPU_GEMM) and a fine-grained E64/top-8 layer: vs a
  loop of per-expert torch matmuls (Hugging Face's eager experts) and ``torch._grouped_mm`` on rows gathered
  beforehand (no gather, gates or scatter: a floor, not a competitor);
* ``grouped_swiglu`` (gate/up GEMM fused with the activation) vs ``grouped_mm`` then ``silu(gate) * up``;
* ``lora_shrink`` + ``lora_expand`` (paged, per-adapter ranks) vs gather + ``bmm`` padded to the largest
  rank, for a decode and a prefill batch at hidden 4096. The kernels sort rows by adapter once per
  ``row_adapter`` tensor and reuse that while the same tensor comes back (as in a serving step, where every
  adapted linear gets the same one), so repeated calls here time the kernels without that sort;
* FP8 quantise / dequantise (E4M3 groups of 128, and COAT's expanded format) vs the torch references.

Times are medians of ``triton.testing.do_bench`` (L2 flushed before each call). Each row gives ms, TFLOP/s
and GB/s of the op's minimal work (every operand read once, every result written once: the same figures
for every implementation, so the ratios are speed-ups) and the share of the roofline of the device
(``roof %`` = roofline time / measured time). fp32 runs with TF32 off (torch's default): cuBLAS and the
kernels' ``tl.dot`` (``input_precision="ieee"``) both multiply in full fp32 on CUDA cores. A ``check``
column gives the largest error of our output against the baseline's, relative to the largest value.
DIR/kernel_gpu.json and DIR/kernel_gpu.md are rewritten after every row, so a timeout keeps what ran; a
failing row records its error and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

GPU = torch.cuda.is_available()
if not GPU:  # the smoke run times Triton's interpreter; it must be chosen before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernel_ops as ops  # noqa: E402  (shapes and baselines shared with the CPU benchmark)
import triton.testing  # noqa: E402

from kernels import fp8, grouped_mm, grouped_swiglu, lora_expand, lora_shrink, use_backend  # noqa: E402

DEVICE = torch.device("cuda" if GPU else "cpu")
# Dense bf16 tensor-core FLOP/s, fp32 CUDA-core FLOP/s and HBM bytes/s from NVIDIA's datasheets; the first
# name fragment found in torch.cuda.get_device_name() wins.
ROOFS = {
    "H200": (989e12, 67e12, 4.8e12),
    "H100 PCIe": (756e12, 51e12, 2.0e12),
    "H100 NVL": (835e12, 60e12, 3.9e12),
    "H100": (989e12, 67e12, 3.35e12),
}
_mixtral = ops.GPU_GEMM
GROUPED = {  # name: (tokens, top_k, experts, K, N)
    **ops.GROUPED_SHAPES,
    "Mixtral w1 E8/k2 K4096 N14336": (_mixtral["rows"] // 2, 2, _mixtral["experts"], _mixtral["k"], _mixtral["n"]),
    "fine-grained E64/k8 K2048 N1024": (4096, 8, 64, 2048, 1024),
}
SWIGLU = {  # name: (tokens, top_k, experts, K, expert width I)
    "Mixtral E8/k2 K4096 I14336": GROUPED["Mixtral w1 E8/k2 K4096 N14336"],
    "fine-grained E64/k8 K2048 I1024": GROUPED["fine-grained E64/k8 K2048 N1024"],
}
LORA = {  # as kernel_ops.LORA_SHAPES
    "decode 256 rows / 64 adapters, H4096": (256, 64, 4096, (8, 16, 32, 64), False),
    "prefill 4096 rows / 8 adapters, H4096": (4096, 8, 4096, (8, 16, 32, 64), True),
}
FP8_NUMEL = 4096 * 14336  # one Mixtral expert projection
SMOKE = dict(grouped={"smoke": (32, 2, 4, 32, 48)}, swiglu={"smoke": (32, 2, 4, 32, 24)},
             lora={"smoke": (16, 4, 64, (1, 8), False)}, fp8_numel=4096)  # fmt: skip


class Results:
    """Rows of timings, written to DIR/kernel_gpu.json and .md after every row."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.meta, self.rows = out, meta, []
        out.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        (self.out / "kernel_gpu.json").write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1))
        (self.out / "kernel_gpu.md").write_text(self.markdown())
        for impl, r in row.get("impls", {}).items():
            print(f"{row['op']:22s} {row['shape']:38s} {row['dtype']:5s} {impl:44s} "
                  + (f"{r['ms']:9.3f} ms {r['tflops']:7.1f} TFLOP/s {r['gbps']:7.0f} GB/s roof {r['roof_pct']:5.1f}%"
                     if "ms" in r else r["error"]), flush=True)  # fmt: skip
        if "error" in row:
            print(f"{row['op']} {row['shape']} {row['dtype']}: {row['error']}", flush=True)

    def markdown(self) -> str:
        m = self.meta
        lines = [f"# Kernel timings on {m['device']}", "",
                 f"torch {m['torch']}, triton {m['triton']}; roofs: {m['roof']}; median of do_bench (rep {m['rep_ms']} ms)."
                 " `vs ours` = that time / ours (> 1: ours faster); `check` = max |ours - baseline| / max |baseline|.", "",
                 "| op | shape | dtype | implementation | ms | TFLOP/s | GB/s | roof % | vs ours | check |",
                 "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in self.rows:
            if "error" in row:
                lines.append(f"| {row['op']} | {row['shape']} | {row['dtype']} | ERROR: {row['error'][:150]} |||||||")
            ours = next(iter(row.get("impls", {}).values()), {}).get("ms")
            for i, (impl, r) in enumerate(row.get("impls", {}).items()):
                if "ms" not in r:
                    lines.append(f"| {row['op']} | {row['shape']} | {row['dtype']} | {impl}: {r['error'][:150]} |||||||")
                    continue
                ratio = f"{r['ms'] / ours:.2f}" if ours else ""
                lines.append(f"| {row['op']} | {row['shape']} | {row['dtype']} | {impl} | {r['ms']:.3f} | {r['tflops']:.1f} "
                             f"| {r['gbps']:.0f} | {r['roof_pct']:.1f} | {ratio} | {'' if i else row['check']} |")  # fmt: skip
        return "\n".join(lines) + "\n"


def _seconds(fn, grad_to_none=None, rep_ms: int = 50) -> float:
    """Median seconds per call: do_bench on CUDA, a few perf_counter repeats in the (interpreted) smoke run."""
    if GPU:
        return triton.testing.do_bench(fn, warmup=10, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median") / 1e3
    return ops._median_times({"fn": fn}, warmup=1, repeats=3)["fn"]


def _roof_name() -> str:
    """The ROOFS entry used: the device's, else H100 SXM's (for an unknown GPU, and in CPU smoke runs)."""
    return next((k for k in ROOFS if k in _device_name()), "H100")


def _roof_text() -> str:
    bf16, fp32, bandwidth = ROOFS[_roof_name()]
    known = "" if _roof_name() in _device_name() else " (not this device: roof % means nothing)"
    return f"{_roof_name()}: {bf16 / 1e12:.0f} bf16 / {fp32 / 1e12:.0f} fp32 TFLOP/s, {bandwidth / 1e12:.2f} TB/s{known}"


def _roof(dtype: torch.dtype) -> tuple[float, float]:
    flops_bf16, flops_fp32, bandwidth = ROOFS[_roof_name()]
    return (flops_fp32 if dtype == torch.float32 else flops_bf16), bandwidth


def _device_name() -> str:
    return torch.cuda.get_device_name() if GPU else platform.processor() or platform.machine()


def _check(ours, baseline) -> str:
    """Largest |ours - baseline| relative to the largest |baseline|, as text (recorded, never asserted)."""
    try:
        with torch.no_grad():
            a, b = ours().float(), baseline().float()
        return f"{((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item():.1e}"
    except Exception as err:  # noqa: BLE001 - the timings may still run (and show the same error per impl)
        return f"check failed: {type(err).__name__}: {err}"[:200]


def run_row(results: Results, op: str, shape: str, dtype: torch.dtype, impls: dict, flops: float, nbytes: float,
            check: str = "", grad_to_none=None, no_grad: bool = True, rep_ms: int = 50) -> None:  # fmt: skip
    """Time every implementation of one op (the first is ours) and record the row; errors are recorded per impl."""
    peak_flops, bandwidth = _roof(dtype)
    bound = max(flops / peak_flops, nbytes / bandwidth)
    row = dict(op=op, shape=shape, dtype=str(dtype).removeprefix("torch."), flops=flops, bytes=nbytes,
               roof_bound_ms=bound * 1e3, check=check, impls={})  # fmt: skip
    for name, fn in impls.items():
        try:
            with torch.no_grad() if no_grad else torch.enable_grad():
                s = _seconds(fn, grad_to_none, rep_ms)
            row["impls"][name] = dict(ms=s * 1e3, tflops=flops / s / 1e12, gbps=nbytes / s / 1e9, roof_pct=100 * bound / s)
        except Exception as err:  # noqa: BLE001 - one failing baseline must not stop the others
            traceback.print_exc()
            row["impls"][name] = dict(error=f"{type(err).__name__}: {err}"[:400])
    results.add(row)


def _expert_loop(x, w_hf, offsets, gather, scatter, gates):
    """Hugging Face's eager MoE experts: per expert, gather its rows, one matmul, scale, index_add_ into place.

    (kernel_ops' CPU loop rebuilds the output out of place per expert; on a GPU that copy would dominate.)
    """
    out = x.new_zeros(gather.shape[0], w_hf.shape[1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            out.index_add_(0, scatter[start:end], (x[gather[start:end]] @ w_hf[e].t()) * gates[start:end, None])
        start = end
    return out


def bench_grouped(results: Results, name: str, shape: tuple, dtype: torch.dtype) -> None:
    tokens, top_k, experts, k, n = shape
    x, w_hf, offsets, gather, scatter, gates = ops._grouped_inputs(*shape, DEVICE, dtype)
    s, w, offs32 = gather.shape[0], w_hf.transpose(1, 2), offsets.int()
    x_grouped = x.detach()[gather].requires_grad_()
    impls = {
        "triton grouped_mm (gather, gates, scatter)": lambda: grouped_mm(
            x, w, offsets, gather_index=gather, scatter_index=scatter, gates=gates),
        "per-expert torch matmul loop": lambda: _expert_loop(x, w_hf, offsets, gather, scatter, gates),
        "torch._grouped_mm, pre-gathered (floor)": lambda: torch._grouped_mm(x_grouped, w, offs32),
    }  # fmt: skip
    check = _check(impls["triton grouped_mm (gather, gates, scatter)"], impls["per-expert torch matmul loop"])
    fwd_bytes = x.element_size() * (tokens * k + experts * k * n + s * n)
    run_row(results, "grouped_mm fwd", name, dtype, impls, 2 * s * k * n, fwd_bytes, check)
    grad = torch.randn(s, n, device=DEVICE, dtype=dtype)
    train = {impl: (lambda fn=fn: fn().backward(grad)) for impl, fn in impls.items()}
    # Backward: dX reads dY and W and writes dX; dW reads X and dY and writes dW: about the forward's bytes each.
    run_row(results, "grouped_mm fwd+bwd", name, dtype, train, 3 * 2 * s * k * n, 3 * fwd_bytes,
            grad_to_none=[x, w_hf, gates, x_grouped], no_grad=False)  # fmt: skip


def bench_swiglu(results: Results, name: str, shape: tuple, dtype: torch.dtype) -> None:
    tokens, top_k, experts, k, width = shape
    x, w_hf, offsets, gather, _, _ = ops._grouped_inputs(tokens, top_k, experts, k, 2 * width, DEVICE, dtype)
    w, s = w_hf.transpose(1, 2), gather.shape[0]  # HF gate_up_proj [E, 2I, K] passed as [E, K, 2I]

    def unfused():
        gate, up = grouped_mm(x, w, offsets, gather_index=gather).chunk(2, dim=1)
        return torch.nn.functional.silu(gate) * up

    impls = {"triton grouped_swiglu (fused)": lambda: grouped_swiglu(x, w, offsets, gather_index=gather),
             "triton grouped_mm, then silu(gate) * up": unfused}  # fmt: skip
    nbytes = x.element_size() * (tokens * k + experts * k * 2 * width + s * width)
    run_row(results, "grouped_swiglu fwd", name, dtype, impls, 2 * s * k * 2 * width, nbytes, _check(*impls.values()))


def bench_lora(results: Results, name: str, shape: tuple, dtype: torch.dtype) -> None:
    x, y, pool, a_table, b_table, ranks, scales, row_adapter = (t.to(DEVICE) for t in ops._lora_inputs(*shape))
    x, y, pool = x.to(dtype), y.to(dtype), pool.to(dtype)
    impls = {
        "triton lora_shrink + lora_expand": lambda: lora_expand(
            y.clone(), lora_shrink(x, pool, a_table, ranks, row_adapter), pool, b_table, ranks, scales, row_adapter),
        "gather + bmm padded to max rank": lambda: ops._padded_bmm(
            x, y, pool, a_table, b_table, scales.to(dtype), row_adapter),
    }  # fmt: skip
    active = row_adapter >= 0
    hidden = x.shape[1]
    flops = 4 * hidden * int(ranks[row_adapter[active]].sum())  # shrink and expand, each row at its own rank
    adapter_bytes = 2 * hidden * int(ranks[torch.unique(row_adapter[active])].sum())  # A and B of adapters present
    nbytes = x.element_size() * (3 * x.numel() + adapter_bytes)  # + x and y read, y written
    run_row(results, "lora shrink+expand", name, dtype, impls, flops, nbytes, _check(*impls.values()))


def bench_fp8(results: Results, name: str, numel: int, dtype=None) -> None:
    """Plain E4M3 of bf16 activations and the expanded format of fp32 moments (``dtype`` is unused)."""
    x = torch.randn(numel, device=DEVICE, dtype=torch.bfloat16)
    codes, scales = fp8.quantize_fp8_torch(x, 128)
    same = bool(torch.equal(fp8.quantize_fp8(x, 128)[0].view(torch.uint8), codes.view(torch.uint8)))
    n_scales = scales.numel() * 4
    run_row(results, "fp8 quantize e4m3", f"{numel} bf16, groups of 128", torch.bfloat16,
            {"triton": lambda: fp8.quantize_fp8(x, 128), "torch reference": lambda: fp8.quantize_fp8_torch(x, 128)},
            0, 3 * numel + n_scales, f"codes identical: {same}")  # fmt: skip
    run_row(results, "fp8 dequantize e4m3", f"{numel} -> bf16, groups of 128", torch.bfloat16,
            {"triton": lambda: fp8.dequantize_fp8(codes, scales, 128, torch.bfloat16),
             "torch reference": lambda: fp8.dequantize_fp8_torch(codes, scales, 128, torch.bfloat16)},
            0, 3 * numel + n_scales,
            _check(lambda: fp8.dequantize_fp8(codes, scales, 128), lambda: fp8.dequantize_fp8_torch(codes, scales, 128)))  # fmt: skip
    moments = x.float().abs_()  # an fp32 optimizer state: what the expanded format stores
    packed = fp8.quantize_fp8_expanded_torch(moments, 128)
    steps = (fp8.quantize_fp8_expanded(moments, 128)[0].view(torch.uint8).int() - packed[0].view(torch.uint8).int())
    stats = packed[1].numel() * 5  # fp32 amax + uint8 16k per group
    run_row(results, "fp8 quantize expanded", f"{numel} fp32, groups of 128", torch.float32,
            {"triton": lambda: fp8.quantize_fp8_expanded(moments, 128),
             "torch reference": lambda: fp8.quantize_fp8_expanded_torch(moments, 128)},
            0, 5 * numel + stats, f"codes 1 step off: {(steps != 0).float().mean().item():.1e}, "
            f"max {steps.abs().max().item()}")  # fmt: skip
    run_row(results, "fp8 dequantize expanded", f"{numel} -> fp32, groups of 128", torch.float32,
            {"triton": lambda: fp8.dequantize_fp8_expanded(*packed, 128),
             "torch reference": lambda: fp8.dequantize_fp8_expanded_torch(*packed, 128)},
            0, 5 * numel + stats, _check(lambda: fp8.dequantize_fp8_expanded(*packed, 128),
                                         lambda: fp8.dequantize_fp8_expanded_torch(*packed, 128)))  # fmt: skip


def _free() -> None:
    if GPU:
        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for kernel_gpu.json and kernel_gpu.md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (the only mode without a GPU)")
    args = parser.parse_args()
    if not GPU and not args.smoke:
        print("kernel_gpu: no CUDA device; nothing timed (use --smoke for the interpreted tiny-shape run)")
        return 0
    if GPU:
        torch.backends.cuda.matmul.allow_tf32 = False  # torch's default, stated: fp32 rows are full fp32
    meta = dict(device=_device_name(), torch=torch.__version__, triton=triton.__version__, smoke=args.smoke,
                rep_ms=50, command=" ".join(sys.argv), roof=_roof_text())
    if GPU:
        meta["capability"] = torch.cuda.get_device_capability()
    results = Results(args.out, meta)
    sizes = SMOKE if args.smoke else dict(grouped=GROUPED, swiglu=SWIGLU, lora=LORA, fp8_numel=FP8_NUMEL)
    dtype = torch.bfloat16 if GPU else torch.float32  # the interpreter's bf16 dot is emulated: fp32 there
    # (bench, shape name, shape, dtype), most wanted first: a timeout (the driver allows ~150 s) loses the least.
    tasks = [(bench_grouped, *item, dtype) for item in sizes["grouped"].items()]
    tasks += [(bench_swiglu, *item, dtype) for item in sizes["swiglu"].items()]
    tasks += [(bench_lora, *item, dtype) for item in sizes["lora"].items()]
    tasks.append((bench_fp8, "fp8", sizes["fp8_numel"], None))
    if GPU and not args.smoke:  # fp32 (no tensor cores) only where it is cheap
        tasks += [(bench_grouped, *item, torch.float32) for item in ops.GROUPED_SHAPES.items()]
    start, failed = time.perf_counter(), 0
    with use_backend("triton"):  # CUDA picks Triton anyway; the smoke run needs it forced onto CPU tensors
        for bench, name, shape, task_dtype in tasks:
            try:
                bench(results, name, shape, task_dtype)
            except Exception as err:  # noqa: BLE001 - record it and go on with the next shape
                traceback.print_exc()
                failed += 1
                error = f"{type(err).__name__}: {err}"[:400]
                results.add(dict(op=bench.__name__, shape=name, dtype=str(task_dtype), error=error))
            _free()  # the shape's tensors are gone with the bench's frame
    print(f"kernel_gpu: {len(results.rows)} rows in {time.perf_counter() - start:.0f} s -> {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
