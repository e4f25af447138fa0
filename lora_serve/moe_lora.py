"""MoE experts for the serving engine: grouped GEMMs over the fused expert weights, plus per-(row, expert) LoRA.

Plugged into transformers' experts interface (``ALL_EXPERTS_FUNCTIONS.register`` +
``model.set_experts_implementation``), so every family whose experts module is decorated with
``@use_experts_implementation`` runs it with its own router, gating and shared experts untouched (tested:
Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; biases and transposed weights as GPT-OSS has are handled, but the
engine refuses GPT-OSS and DeepSeek-V3 for their attention, see ``model_runner.py``). Per layer:

1. the (token, chosen expert) pairs are sorted by expert once and both projections run as one
   ``kernels.grouped_mm`` each (Triton on GPU, ``torch._grouped_mm`` on CPU), not a loop over experts;
2. when the step has adapter rows, the pairs are grouped by (row's adapter, expert) once
   (``PagedExpertLoRA.segments``, from the step's ``LoRASegments.row_adapter``) and each projection adds
   ``scale · x A_{a,e}ᵀ B_{a,e}ᵀ`` to its output with one grouped shrink and one grouped expand
   (``kernels.lora.add_expert_lora``), reading the adapters from the paged pool; ``W + ΔW`` is never formed.

LoRA is added to a projection's output before the activation (gate_up) and before the gate weight and
bias (down), which is where PEFT's ``W + ΔW`` puts it. The step comes from the engine's ``ActiveStep``,
as for the adapted linears: transformers calls experts with hidden states and routing only.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from kernels import grouped_mm
from kernels.lora import PagedExpertLoRA, PagedLoRA, add_expert_lora

from .adapter_store import ExpertsShape
from .step_batch import ActiveStep

EXPERTS_NAME = "lora_serve_experts"
_STATE = "lora_serve_experts"  # attribute of each experts module holding its ExpertsLoRA


def is_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers fused-experts module (``@use_experts_implementation``)."""
    return hasattr(module, "is_transposed") and isinstance(getattr(module, "down_proj", None), nn.Parameter)


def projections(module: nn.Module) -> dict[str, ExpertsShape]:
    """The fused projections of experts ``module`` LoRA may target, in registration order (PEFT nests its
    wrappers in that order), with their logical ``in -> out`` per expert."""
    shapes = {}
    for name, param in module.named_parameters(recurse=False):
        if name in ("gate_up_proj", "up_proj", "down_proj") and param.dim() == 3:
            e, first, second = param.shape
            # transformers stores [E, out, in] unless the family says is_transposed ([E, in, out]).
            in_features, out_features = (first, second) if module.is_transposed else (second, first)
            shapes[name] = ExpertsShape(e, in_features, out_features)
    return shapes


class ExpertsLoRA:
    """One experts module's serving state: the engine's active step and its projections' paged LoRA."""

    def __init__(self, active: ActiveStep):
        self.active = active
        self.projections: dict[str, PagedExpertLoRA] = {}

    def adapt(self, module: nn.Module, param: str, pool: torch.Tensor, capacity: int) -> PagedExpertLoRA:
        """The page tables of projection ``param`` (created on first use) for ``capacity`` resident adapters."""
        if param not in self.projections:
            shape = projections(module).get(param)
            if shape is None:
                raise ValueError(f"{type(module).__name__} has no fused projection {param!r}")
            paged = PagedLoRA(pool, shape.in_features, shape.out_features, capacity * shape.num_experts)
            self.projections[param] = PagedExpertLoRA(paged, shape.num_experts)
        return self.projections[param]

    def segments(self, tokens: int, token_of_pair: torch.Tensor, expert_of_pair: torch.Tensor):
        """The step's (token, expert) pairs grouped by (adapter, expert), or None when no LoRA applies.

        ``tokens`` is how many token rows the experts got: the step's packed rows, one per token.
        """
        step = self.active.batch
        tables = next((p for p in self.projections.values() if p.num_set), None)
        if step is None or step.lora is None or tables is None:
            return None
        if step.lora.num_rows != tokens:
            raise RuntimeError(f"experts got {tokens} token rows but the step packs {step.lora.num_rows}")
        # Every projection of a layer shares the capacity and E, so one grouping serves them all; sized by the
        # adapter indices this step uses (known on the host), not the table's capacity.
        return tables.segments(step.lora.row_adapter[token_of_pair], expert_of_pair, step.lora.adapters_used)

    def adapts(self, param: str, segments) -> bool:
        """Whether projection ``param`` has LoRA to add in this step (``segments`` from :meth:`segments`)."""
        tables = self.projections.get(param)
        return segments is not None and tables is not None and tables.num_set > 0

    def add(self, param: str, y: torch.Tensor, x: torch.Tensor, segments) -> None:
        """``y += scale · x A_{a,e}ᵀ B_{a,e}ᵀ`` per pair for projection ``param`` (nothing if not adapted)."""
        if self.adapts(param, segments):
            add_expert_lora(y, x, self.projections[param], segments)


def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers experts-interface entry: ``[T, H]`` tokens, ``[T, k]`` experts and gate weights -> ``[T, H]``."""
    state: ExpertsLoRA | None = getattr(self, _STATE, None)
    if state is None:
        raise RuntimeError(
            f"experts implementation {EXPERTS_NAME!r} runs only inside a lora_serve.Engine's model "
            f"({type(self).__name__} was not set up by one)"
        )
    tokens, top_k = top_k_index.shape
    flat_expert = top_k_index.reshape(-1)
    order = flat_expert.argsort(stable=True)  # pairs by expert, tokens in order within an expert
    sorted_expert = flat_expert[order]
    # End offset of each expert's pairs; a search keeps the shape static (bincount's is data-dependent).
    offsets = torch.searchsorted(sorted_expert, torch.arange(self.num_experts, device=flat_expert.device), right=True)
    token_of_pair = order // top_k
    segments = state.segments(tokens, token_of_pair, sorted_expert)

    in_name = "gate_up_proj" if self.has_gate else "up_proj"
    w_in, w_out = getattr(self, in_name), self.down_proj
    if not self.is_transposed:  # stored as [E, out, in]; the GEMM wants (in, out) per expert, a view
        w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
    x = hidden_states.index_select(0, token_of_pair)
    projected = grouped_mm(x, w_in, offsets)
    state.add(in_name, projected, x, segments)
    if self.has_bias:
        projected = projected + getattr(self, f"{in_name}_bias")[sorted_expert]
    activated = self._apply_gate(projected) if self.has_gate else self.act_fn(projected)
    gates = top_k_weights.reshape(-1)[order]
    post_norm = getattr(self, "has_post_expert_norm", False)
    if not (self.has_bias or post_norm or state.adapts("down_proj", segments)):
        # Nothing to add between the GEMM and the gates: the GEMM applies them (in fp32) and writes the rows
        # back in (token, choice) order itself.
        out = grouped_mm(activated, w_out, offsets, gates=gates, scatter_index=order)
        return out.view(tokens, top_k, -1).sum(dim=1, dtype=torch.float32).to(hidden_states.dtype)
    out = grouped_mm(activated, w_out, offsets)
    state.add("down_proj", out, activated, segments)
    if self.has_bias:
        out = out + self.down_proj_bias[sorted_expert]
    if post_norm:
        out = self.post_expert_norm(out)
    # Gates are applied and the k outputs summed in fp32 before rounding, as transformers' experts do for
    # low-precision models whose routers return fp32 weights.
    weighted = out.float() * gates.float().unsqueeze(1)
    per_choice = torch.empty_like(weighted).index_copy_(0, order, weighted)
    return per_choice.view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def install(model: nn.Module, active: ActiveStep) -> dict[str, nn.Module]:
    """Switch ``model``'s experts to :func:`experts_forward` reading ``active``; return the experts modules by
    name (empty, and the model untouched, when it has none)."""
    experts = {name: m for name, m in model.named_modules() if is_experts(m)}
    if experts:
        for module in experts.values():
            setattr(module, _STATE, ExpertsLoRA(active))
        model.set_experts_implementation(EXPERTS_NAME)
    return experts


def adapt(module: nn.Module, param: str, pool: torch.Tensor, capacity: int) -> PagedExpertLoRA:
    """The page tables of projection ``param`` of experts ``module`` (installed by :func:`install`)."""
    return getattr(module, _STATE).adapt(module, param, pool, capacity)


ALL_EXPERTS_FUNCTIONS.register(EXPERTS_NAME, experts_forward)
