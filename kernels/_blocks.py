"""Launch helpers shared by the Triton kernels: row-block schedules and per-device configs."""

import torch
import triton
import triton.language as tl

from .backend import interpreter_enabled


@triton.jit
def locate_block(ENDS, num_groups, block_id, BLOCK_M: tl.constexpr, GROUPS: tl.constexpr):
    """Row block ``block_id`` of a padding-free schedule over groups of rows, found inside a kernel.

    Group ``g`` holds rows ``[ENDS[g - 1], ENDS[g])`` (``[0, ENDS[0])`` for the first); each group's rows are
    tiled into blocks of at most ``BLOCK_M`` rows, so a block never spans two groups and only a group's last
    block is partial (ScatterMoE's schedule). ``GROUPS`` is a power of two >= ``num_groups``.

    Every program reads the groups' ends (a few hundred at most) and finds its own block, so a launch
    needs no schedule tensors and never synchronises the stream: building them with torch took about a
    dozen small ops per call, whose host time exceeded the grouped GEMM itself at a few thousand rows.

    Returns ``(group, first_row, end_row)``; ``group >= num_groups`` marks an unused program of the
    launch's upper bound (:func:`located_blocks`).
    """
    g = tl.arange(0, GROUPS)
    valid = g < num_groups
    ends = tl.load(ENDS + g, mask=valid, other=0).to(tl.int32)
    starts = tl.load(ENDS + g - 1, mask=valid & (g > 0), other=0).to(tl.int32)
    blocks = tl.where(valid, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    cumulative = tl.cumsum(blocks, 0)
    group = tl.sum((cumulative <= block_id).to(tl.int32), 0)  # empty groups are skipped: same cumulative
    here = g == group
    first_row = tl.sum(tl.where(here, starts + (block_id - cumulative + blocks) * BLOCK_M, 0), 0)
    return group, first_row, tl.sum(tl.where(here, ends, 0), 0)


def located_blocks(num_rows: int, num_groups: int, block_m: int) -> int:
    """Programs along the row axis for :func:`locate_block`: an upper bound on the schedule's blocks
    (full blocks, plus at most one partial block per non-empty group)."""
    return triton.cdiv(num_rows, block_m) + min(num_groups, num_rows)


def launch_config(configs: dict[str, dict], device: torch.device) -> dict:
    """Pick the declared config for ``device``: ``interpreter`` on CPU, ``sm90`` on Hopper+, else ``sm80``."""
    if device.type != "cuda":
        return configs["interpreter"]
    major, _ = torch.cuda.get_device_capability(device)
    return configs["sm90" if major >= 9 else "sm80"]


def input_precision(dtype: torch.dtype) -> str:
    """fp32 ``tl.dot`` precision that matches torch: TF32 only where torch's own matmul would use it."""
    allow_tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return "tf32" if allow_tf32 else "ieee"


def upcast_in_interpreter(dtype: torch.dtype) -> bool:
    """The interpreter's bf16 ``tl.dot`` is wrong (measured): upcast bf16 tiles to fp32 there."""
    return dtype == torch.bfloat16 and interpreter_enabled()
