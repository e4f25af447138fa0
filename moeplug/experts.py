"""Routed experts over 3-D weights: tokens sorted by expert, then grouped matmuls.

No Python loop over experts or tokens: assignments are sorted once by expert and both expert
projections run as one grouped GEMM each (`kernels.grouped_mm`: Triton on CUDA, `torch._grouped_mm`
on CPU). The first GEMM reads token rows in place through the sort order and the second writes
its rows straight back to (token, choice) order with the gate weights applied.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from kernels import grouped_mm
from kernels.backend import use_triton

from .dispatch import ExpertParallel, expert_parallel_forward

ACT_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": nn.functional.silu,
    "gelu": nn.functional.gelu,
    "relu": nn.functional.relu,
}


def routed_experts_forward(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor],
    in_bias: torch.Tensor | None = None,
    out_bias: torch.Tensor | None = None,
    post_norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
    may_drop: bool = False,
) -> torch.Tensor:
    """Apply each token's k experts and sum their gated outputs.

    Args:
        hidden: [T, H] tokens.
        top_k_index: [T, k] expert per slot; with `may_drop`, values >= E mark dropped slots.
        top_k_weights: [T, k] gate weight per slot (0 at dropped slots), in hidden's dtype or fp32:
            gates are applied and the k outputs summed in fp32 before rounding to hidden's dtype.
        w_in: [E, H, N] first projection as (in, out) per expert; any strides (a transposed view
            of Hugging Face's [E, N, H] parameter is used as is).
        w_out: [E, I, H] second projection, (in, out) per expert.
        activation: maps the first projection's [S, N] output to [S, I] (e.g. SwiGLU, N = 2I).
        in_bias / out_bias: optional [E, N] / [E, H] per-expert biases.
        post_norm: optional module applied to each expert output before gating.
        may_drop: whether `top_k_index` can hold dropped slots (capacity, expert parallelism). In
            eager mode their rows are skipped, which needs the kept count on the host; under
            torch.compile/export they run through the last expert with their zero gate instead,
            so shapes stay static. Without it nothing here reads a tensor value on the host.
    Returns:
        [T, H] in hidden's dtype.
    """
    tokens, top_k = top_k_index.shape
    num_experts = w_in.shape[0]
    flat_expert = top_k_index.reshape(-1)
    skip_dropped = may_drop and not torch.compiler.is_compiling()
    if may_drop and not skip_dropped:
        flat_expert = flat_expert.clamp(max=num_experts - 1)
    # Stable sort keeps each expert's slots in token order; dropped slots (index E) sort last.
    order = flat_expert.argsort(stable=True)
    sorted_expert = flat_expert[order]
    # End offset of each expert's rows; a search keeps the shape static (bincount's is data-dependent).
    offsets = torch.searchsorted(sorted_expert, torch.arange(num_experts, device=flat_expert.device), right=True)
    all_kept = True
    if skip_dropped:
        kept = int(offsets[-1])
        all_kept = kept == tokens * top_k
        order, sorted_expert = order[:kept], sorted_expert[:kept]
    gates = top_k_weights.reshape(-1)[order]

    token_of_slot = order // top_k
    if use_triton(hidden.device):  # the kernel reads scattered rows itself (ScatterMoE)
        projected = grouped_mm(hidden, w_in, offsets, gather_index=token_of_slot)
    else:  # torch path: gather once and keep the rows for dW instead of gathering again in backward
        projected = grouped_mm(hidden.index_select(0, token_of_slot), w_in, offsets)
    if in_bias is not None:
        projected = projected + in_bias[sorted_expert]
    activated = activation(projected)

    fuse_epilogue = out_bias is None and post_norm is None
    out = grouped_mm(
        activated, w_out, offsets,
        gates=gates if fuse_epilogue else None,
        scatter_index=order if fuse_epilogue and all_kept else None,
    )
    if not fuse_epilogue:
        if out_bias is not None:
            out = out + out_bias[sorted_expert]
        if post_norm is not None:
            out = post_norm(out)
        out = out * gates.unsqueeze(-1)
    if not (fuse_epilogue and all_kept):
        # Dropped slots contribute nothing: place kept rows back in (token, choice) order.
        out = out.new_zeros(tokens * top_k, out.shape[-1]).index_copy(0, order, out)
    return out.view(tokens, top_k, w_out.shape[-1]).sum(dim=1, dtype=torch.float32).to(hidden.dtype)


def run_experts(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor],
    in_bias: torch.Tensor | None = None,
    out_bias: torch.Tensor | None = None,
    post_norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ep: ExpertParallel | None = None,
    may_drop: bool = False,
) -> torch.Tensor:
    """`routed_experts_forward` on all experts, or across ranks when `ep` shards them.

    With `ep`, the weights and biases hold only this rank's experts (local ids 0..E/P-1) while
    `top_k_index` holds global ids. `may_drop`: whether routing can drop slots (capacity).
    """
    if ep is None or ep.ep_size == 1:
        return routed_experts_forward(hidden, top_k_index, top_k_weights, w_in, w_out, activation,
                                      in_bias, out_bias, post_norm, may_drop)

    def local(rows: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        ones = rows.new_ones(rows.shape[0], 1)
        # Padding columns of a message carry the local sentinel id: always skip them.
        return routed_experts_forward(rows, local_ids.unsqueeze(1), ones, w_in, w_out, activation,
                                      in_bias, out_bias, post_norm, may_drop=True)

    return expert_parallel_forward(hidden, top_k_index, top_k_weights, local, ep)


def shard_experts_(module: nn.Module, ep: ExpertParallel, names: tuple[str, ...]) -> None:
    """Keep only this rank's experts in each [E, ...] parameter `names` of `module`, in place."""
    keep = slice(ep.local_experts.start, ep.local_experts.stop)
    for name in names:
        param = getattr(module, name, None)
        if param is not None:
            setattr(module, name, nn.Parameter(param.data[keep].clone(), requires_grad=param.requires_grad))


def _gated(activation: Callable[[torch.Tensor], torch.Tensor], gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return activation(gate) * up


def swiglu(activation: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Gated activation over a concatenated [gate; up] projection: act(gate) * up.

    A partial of a module-level function, so modules holding it pickle and deep-copy.
    """
    return functools.partial(_gated, activation)


class GroupedExperts(nn.Module):
    """E gated (SwiGLU-style) experts stored as 3-D weights in Hugging Face's layout.

    gate_up_proj: [E, 2I, H] (gate rows first, then up rows); down_proj: [E, H, I].
    The same layout as transformers' Mixtral/Qwen experts, so weights copy over unchanged.
    After `shard_(ep)` only this rank's E/P experts remain and tokens travel by all-to-all.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str = "silu"):
        super().__init__()
        self.num_experts = num_experts
        self.ep: ExpertParallel | None = None
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.activation = swiglu(ACT_FNS[activation])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise like nn.Linear per expert (Kaiming-uniform on the input width)."""
        for weight in (self.gate_up_proj, self.down_proj):
            bound = 1.0 / weight.shape[-1] ** 0.5
            nn.init.uniform_(weight, -bound, bound)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                may_drop: bool = False) -> torch.Tensor:
        """[T, H] tokens, [T, k] experts and gate weights -> [T, H] (`may_drop`: see `run_experts`)."""
        return run_experts(hidden, top_k_index, top_k_weights, self.gate_up_proj.transpose(1, 2),
                           self.down_proj.transpose(1, 2), self.activation, ep=self.ep, may_drop=may_drop)

    def shard_(self, ep: ExpertParallel) -> None:
        """Keep only this rank's experts (the same init on every rank gives the EP=1 weights)."""
        shard_experts_(self, ep, ("gate_up_proj", "down_proj"))
        self.ep = ep
