"""Launch helpers shared by the Triton kernels: row-block schedules and per-device configs."""

import torch
import triton

from .backend import interpreter_enabled


def block_schedule(starts: torch.Tensor, ends: torch.Tensor, block_m: int, num_rows: int):
    """Tile each group's rows ``[starts[g], ends[g])`` into blocks of at most ``block_m`` rows.

    A block never spans two groups (ScatterMoE's padding-free schedule: only the last block of a group is
    partial). Built with tensor ops only, so a GPU stream is never synchronised: the number of blocks is
    bounded by ``ceil(num_rows / block_m) + min(groups, num_rows)`` and the unused tail gets group -1.

    Needs at least one group.

    Returns:
        ``(block_group, block_start)``: int32 tensors of that bound's length, on ``ends``' device.
    """
    starts, ends = starts.long(), ends.long()
    per_group = (ends - starts + block_m - 1).div(block_m, rounding_mode="floor")
    cumulative = per_group.cumsum(0)
    num_blocks = triton.cdiv(num_rows, block_m) + min(ends.shape[0], num_rows)
    block = torch.arange(num_blocks, device=ends.device)
    group = torch.searchsorted(cumulative, block, right=True)
    valid = group < ends.shape[0]
    group = group.clamp(max=ends.shape[0] - 1)
    block_start = starts[group] + (block - cumulative[group] + per_group[group]) * block_m
    return torch.where(valid, group, -1).to(torch.int32), block_start.to(torch.int32)


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
