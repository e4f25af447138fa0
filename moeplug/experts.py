"""Routed experts over 3-D weights: tokens sorted by expert, then grouped matmuls.

No Python loop over experts or tokens: assignments are sorted once by expert and both expert
projections run as one grouped GEMM each (`kernels.grouped_mm`: Triton on CUDA, `torch._grouped_mm`
on CPU). The first GEMM reads token rows in place through the sort order and the second writes
its rows straight back to (token, choice) order with the gate weights applied.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kernels import grouped_mm
from kernels.backend import use_triton

from .dispatch import expert_parallel_forward
from .ep_layout import ExpertParallel

ACT_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": nn.functional.silu,
    "gelu": nn.functional.gelu,
    "relu": nn.functional.relu,
}


@dataclass
class LowRank:
    """A per-expert low-rank update of a projection, (in, out) per expert: delta_e = scaling * first_e @ second_e.

    first: [E, in, r]; second: [E, r, out]; any strides. A LoRA adapter's A_e^T and B_e^T.
    """

    first: torch.Tensor
    second: torch.Tensor
    scaling: float


@dataclass
class ExpertWeights:
    """The weights of E routed experts as the grouped GEMMs read them.

    Attributes:
        w_in: [E, H, N] first projection as (in, out) per expert; any strides (a transposed view
            of Hugging Face's [E, N, H] parameter is used as is).
        w_out: [E, I, H] second projection, (in, out) per expert.
        activation: maps the first projection's [S, N] output to [S, I] (e.g. SwiGLU, N = 2I).
        in_bias / out_bias: optional [E, N] / [E, H] per-expert biases.
        post_norm: optional module applied to each expert output before gating.
        in_lora / out_lora: optional low-rank updates of w_in / w_out (LoRA on the experts), run as
            two thin grouped GEMMs beside the projection, never added to the weights.
    """

    w_in: torch.Tensor
    w_out: torch.Tensor
    activation: Callable[[torch.Tensor], torch.Tensor]
    in_bias: torch.Tensor | None = None
    out_bias: torch.Tensor | None = None
    post_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    in_lora: LowRank | None = None
    out_lora: LowRank | None = None


def _grouped_linear(rows: torch.Tensor, weight: torch.Tensor, lora: LowRank | None, offsets: torch.Tensor,
                    gather_index: torch.Tensor | None = None, gates: torch.Tensor | None = None,
                    scatter_index: torch.Tensor | None = None) -> torch.Tensor:
    """`grouped_mm` of rows by (W_e + delta_e) per expert, with delta = `lora` applied as x A^T B^T.

    Gating and scattering are linear, so the low-rank term takes the same epilogue as the main product.
    """
    out = grouped_mm(rows, weight, offsets, gather_index=gather_index, gates=gates, scatter_index=scatter_index)
    if lora is None:
        return out
    low = grouped_mm(rows, lora.first, offsets, gather_index=gather_index)
    return out + lora.scaling * grouped_mm(low, lora.second, offsets, gates=gates, scatter_index=scatter_index)


def routed_experts_forward(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                           experts: ExpertWeights, may_drop: bool = False) -> torch.Tensor:
    """Apply each token's k experts and sum their gated outputs.

    Args:
        hidden: [T, H] tokens.
        top_k_index: [T, k] expert per slot; with `may_drop`, values >= E mark dropped slots.
        top_k_weights: [T, k] gate weight per slot (0 at dropped slots), in hidden's dtype or fp32:
            gates are applied and the k outputs summed in fp32 before rounding to hidden's dtype.
        experts: the experts' weights.
        may_drop: whether `top_k_index` can hold dropped slots (capacity, expert parallelism). In
            eager mode their rows are skipped, which needs the kept count on the host; under
            torch.compile/export they run through the last expert with their zero gate instead,
            so shapes stay static. Without it nothing here reads a tensor value on the host.
    Returns:
        [T, H] in hidden's dtype.
    """
    tokens, top_k = top_k_index.shape
    num_experts = experts.w_in.shape[0]
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
        projected = _grouped_linear(hidden, experts.w_in, experts.in_lora, offsets, gather_index=token_of_slot)
    else:  # torch path: gather once and keep the rows for dW instead of gathering again in backward
        projected = _grouped_linear(hidden.index_select(0, token_of_slot), experts.w_in, experts.in_lora, offsets)
    if experts.in_bias is not None:
        projected = projected + experts.in_bias[sorted_expert]
    activated = experts.activation(projected)

    fuse_epilogue = experts.out_bias is None and experts.post_norm is None
    out = _grouped_linear(
        activated, experts.w_out, experts.out_lora, offsets,
        gates=gates if fuse_epilogue else None,
        scatter_index=order if fuse_epilogue and all_kept else None,
    )
    if not fuse_epilogue:
        if experts.out_bias is not None:
            out = out + experts.out_bias[sorted_expert]
        if experts.post_norm is not None:
            out = experts.post_norm(out)
        out = out * gates.unsqueeze(-1)
    if not (fuse_epilogue and all_kept):
        # Dropped slots contribute nothing: place kept rows back in (token, choice) order.
        out = out.new_zeros(tokens * top_k, out.shape[-1]).index_copy(0, order, out)
    return out.view(tokens, top_k, experts.w_out.shape[-1]).sum(dim=1, dtype=torch.float32).to(hidden.dtype)


def run_experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                experts: ExpertWeights, ep: ExpertParallel, may_drop: bool = False) -> torch.Tensor:
    """`routed_experts_forward` on all experts, or across ranks when `ep` shards them.

    With ep_size > 1, the weights hold only this rank's experts (local ids 0..E/P-1) while
    `top_k_index` holds global ids. `may_drop`: whether routing can drop slots (capacity).
    """
    if ep.ep_size == 1:
        return routed_experts_forward(hidden, top_k_index, top_k_weights, experts, may_drop)

    def local(rows: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        ones = rows.new_ones(rows.shape[0], 1)
        # Padding columns of a message carry the local sentinel id: always skip them.
        return routed_experts_forward(rows, local_ids.unsqueeze(1), ones, experts, may_drop=True)

    return expert_parallel_forward(hidden, top_k_index, top_k_weights, local, ep)


def shard_experts_(module: nn.Module, ep: ExpertParallel, names: tuple[str, ...]) -> None:
    """Keep only this rank's experts (contiguous layout) in each [E, ...] parameter `names` of `module`."""
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
    """The routed experts of a `MoELayer`: E gated (SwiGLU-style) experts as 3-D weights in Hugging Face's layout.

    gate_up_proj: [E, 2I, H] (gate rows first, then up rows); down_proj: [E, H, I].
    The same layout as transformers' Mixtral/Qwen experts, so weights copy over unchanged.
    Its expert-parallel layout is its layer's `MoEState.ep` (attribute `moeplug`, set by `MoELayer`):
    when sharded, only this rank's experts remain and tokens travel by all-to-all.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str = "silu"):
        super().__init__()
        self.num_experts = num_experts
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
        """[T, H] tokens, [T, k] experts and gate weights -> [T, H] (`may_drop`: see `routed_experts_forward`)."""
        weights = ExpertWeights(self.gate_up_proj.transpose(1, 2), self.down_proj.transpose(1, 2), self.activation)
        return run_experts(hidden, top_k_index, top_k_weights, weights, self.moeplug.ep, may_drop)
