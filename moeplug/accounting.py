"""Expert-load accounting over one optimizer step: micro-batches and data-parallel ranks.

Each MoE layer owns a `StepCounts`. During training it adds every micro-batch's assignments
per expert; `BalanceController.step()` reads the step's totals and resets them when the optimizer
steps. For global-batch balancing (`balance="global"`) the counts are summed over ranks at every
micro-batch, so the loss of micro-batch m uses the running global frequencies of micro-batches
1..m of the step (Megatron-Core's semantics; the last micro-batch sees the whole global batch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sum `tensor` over `group` in place (counts carry no gradient, so no autograd op is needed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


class StepCounts:
    """Running per-expert assignment counts and token count of the current optimizer step.

    `synced` tells whether the stored totals are already summed over the process group
    (true when every micro-batch was all-reduced on arrival).
    """

    def __init__(self, num_experts: int, group=None):
        self.num_experts = num_experts
        self.group = group
        self.device = torch.device("cpu")  # where collectives run (the counts' device: NCCL needs CUDA)
        self.reset()

    def reset(self) -> None:
        """Forget the current step's counts (called when the optimizer steps)."""
        self.counts = torch.zeros(self.num_experts, dtype=torch.float64)
        self.tokens = 0.0
        self.micro_batches = 0
        self.synced = True

    def add(self, counts: torch.Tensor, tokens: torch.Tensor | float, sync: bool) -> tuple[torch.Tensor, float]:
        """Add one micro-batch's local counts; with `sync`, sum them over ranks first.

        Returns the running (counts [E], tokens) of the step so far, on `counts`' device.
        """
        packed = torch.cat([counts.detach().double().reshape(-1), torch.as_tensor(tokens, dtype=torch.float64,
                                                                                  device=counts.device).reshape(1)])
        self.device = counts.device
        if sync:
            _all_reduce_sum(packed, self.group)
        else:
            self.synced = False
        packed = packed.cpu()
        self.counts += packed[:-1]
        self.tokens += float(packed[-1])
        self.micro_batches += 1
        return self.running(counts.device)

    def running(self, device: torch.device) -> tuple[torch.Tensor, float]:
        """The step's counts so far (as stored: global if synced) on `device`, and their tokens."""
        return self.counts.to(device, torch.float32), self.tokens

    def totals(self) -> tuple[torch.Tensor, float]:
        """The step's (counts [E], tokens) summed over ranks (all-reduces once if not yet synced).

        Every rank must call this together when the counts were added without `sync`.
        """
        if not self.synced:
            packed = torch.cat([self.counts, torch.tensor([self.tokens], dtype=torch.float64)]).to(self.device)
            packed = _all_reduce_sum(packed, self.group).cpu()
            return packed[:-1], float(packed[-1])
        return self.counts.clone(), self.tokens
