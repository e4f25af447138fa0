"""BalanceController: the optimizer-step boundary for global-batch and aux-loss-free balancing.

Gradient accumulation means several forward passes per optimizer step, and only the training loop
knows where a step ends. The controller hooks the optimizer (a step pre-hook, as TorchTitan does)
so that, once per optimizer step, it:

1. reads each MoE layer's expert loads over the step (all micro-batches, summed over ranks),
2. moves the aux-loss-free routing bias: bias_i += rate * sign(mean load - load_i),
3. records balance metrics and resets the counts for the next step.

Plain PyTorch, Accelerate and DeepSpeed loops need nothing else: the hook fires exactly when the
wrapped torch optimizer steps. Without an optimizer, call `step()` yourself after each step.
"""

from __future__ import annotations

import torch
from torch import nn

from .accounting import StepCounts
from .state import MoEState, moe_modules


def _innermost(optimizer):
    """The torch optimizer inside Accelerate/DeepSpeed wrappers: it steps once per real step."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class BalanceController:
    """Per-optimizer-step expert-load accounting, aux-loss-free bias updates and balance metrics.

    Args:
        model: a model patched by `moeplug.patch_model` or built from `MoELayer`s.
        optimizer: if given, `step()` runs automatically right before each optimizer step (also
            through Accelerate's and DeepSpeed's optimizer wrappers, which skip accumulation steps).
            A step with no training forward since the last one is not counted, so optimizers that
            are stepped once per param group (DeepSpeed ZeRO-1/2) close each real step once.
        bias_update_rate: aux-loss-free balancing rate (DeepSeek-V3 uses 1e-3); 0 disables it.
        group: process group whose ranks' loads are summed (default: all ranks, if initialised).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 bias_update_rate: float = 0.0, group=None):
        if bias_update_rate < 0:
            raise ValueError(f"bias_update_rate={bias_update_rate} must be >= 0")
        self.layers: dict[str, MoEState] = {m.name: m.state for m in moe_modules(model)}
        if not self.layers:
            raise ValueError("model has no moeplug MoE layers: call moeplug.patch_model(model) first "
                             "or build the model from moeplug.MoELayer")
        self.bias_update_rate = bias_update_rate
        for layer in self.layers.values():
            layer.step_counts = StepCounts(layer.config.num_experts, group)
            layer.biased_selection = bias_update_rate > 0
        self.last_step_counts: dict[str, torch.Tensor] = {}
        self.steps = 0
        self._hook = None
        if optimizer is not None:
            self._hook = _innermost(optimizer).register_step_pre_hook(self._before_optimizer_step)

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        # DeepSpeed ZeRO-1/2 step the torch optimizer once per param group (expert parameters have their
        # own), so one real step can fire this hook several times: only the first one has counts to close.
        if self._counted_since_last_step():
            self.step()

    def _counted_since_last_step(self) -> bool:
        return any(layer.step_counts.micro_batches > 0 for layer in self.layers.values())

    def step(self) -> dict[str, float]:
        """Close the current optimizer step: update biases, record loads, reset counts.

        Returns `metrics()`. Layers that saw no training forward this step are skipped.
        """
        self.last_step_counts = {}
        for name, layer in self.layers.items():
            counts_of_step = layer.step_counts
            if counts_of_step.micro_batches == 0:
                continue
            counts, _ = counts_of_step.totals()
            if self.bias_update_rate > 0:
                bias = layer.selection_bias
                with torch.no_grad():
                    update = torch.sign(counts.mean() - counts) * self.bias_update_rate
                    bias.add_(update.to(bias.device, bias.dtype))
            self.last_step_counts[name] = counts
            counts_of_step.reset()
        self.steps += 1
        return self.metrics()

    def metrics(self) -> dict[str, float]:
        """Balance metrics of the last closed step (loads) and the last forward (losses, drops).

        Keys: `moe/max_over_mean` (mean over layers of busiest-expert load / mean load),
        `moe/max_over_mean_worst`, `moe/dead_experts` (experts with no tokens, summed over layers),
        and, when computed, `moe/lbl`, `moe/z_loss`, `moe/dropped`, `moe/entropy` (means/sums over
        layers of the last forward), plus `moe/<layer>/max_over_mean` per layer.
        """
        out: dict[str, float] = {}
        ratios = {}
        for name, counts in self.last_step_counts.items():
            mean = counts.mean()
            ratios[name] = float(counts.max() / mean) if mean > 0 else 0.0
            out[f"moe/{name or 'layer'}/max_over_mean"] = ratios[name]
        if ratios:
            out["moe/max_over_mean"] = sum(ratios.values()) / len(ratios)
            out["moe/max_over_mean_worst"] = max(ratios.values())
            out["moe/dead_experts"] = float(sum(int((c == 0).sum()) for c in self.last_step_counts.values()))
        stats = [layer.stats for layer in self.layers.values() if layer.stats is not None]
        if stats:
            out["moe/dropped"] = float(sum(s.dropped for s in stats))
            out["moe/entropy"] = sum(s.entropy for s in stats) / len(stats)
            for key in ("lbl", "z_loss"):
                values = [getattr(s, key) for s in stats if getattr(s, key) is not None]
                if values:
                    out[f"moe/{key}"] = sum(values) / len(values)
        return out

    def state_dict(self) -> dict:
        """Routing biases by layer name (save with the optimizer state; transformers checkpoints
        keep only DeepSeek-V3's own bias)."""
        return {"steps": self.steps,
                "biases": {name: layer.selection_bias.detach().cpu().clone() for name, layer in self.layers.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore biases saved by `state_dict` (layer names must match)."""
        missing = sorted(set(self.layers) - set(state["biases"]))
        if missing:
            raise KeyError(f"saved balance state lacks layers {missing}")
        self.steps = state["steps"]
        with torch.no_grad():
            for name, layer in self.layers.items():
                bias = layer.selection_bias
                bias.copy_(state["biases"][name].to(bias.device, bias.dtype))

    def close(self) -> None:
        """Stop accounting: remove the optimizer hook and the layers' step counters."""
        if self._hook is not None:
            self._hook.remove()
        for layer in self.layers.values():
            layer.step_counts = None
            layer.biased_selection = False
