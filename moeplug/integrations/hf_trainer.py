"""HF `Trainer` integration: close balancing steps at each optimizer step and log balance metrics.

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[MoEBalanceCallback(bias_update_rate=1e-3)])

puts `moe/*` metrics into `trainer.state.log_history` and the console log. Reporting integrations
(TensorBoard, W&B, ...) run before user callbacks; to have them see the metrics too, use
`add_balance_callback(trainer, ...)`, which registers the callback first.
"""

from __future__ import annotations

from transformers import Trainer, TrainerCallback

from ..controller import BalanceController


class MoEBalanceCallback(TrainerCallback):
    """Runs a `BalanceController` over the Trainer's optimizer steps.

    Args:
        bias_update_rate: aux-loss-free balancing rate (0 disables it).
        per_layer: also log `moe/<layer>/max_over_mean` for every layer.
        group: process group whose expert loads are summed (default: all ranks).
    """

    def __init__(self, bias_update_rate: float = 0.0, per_layer: bool = False, group=None):
        self.bias_update_rate = bias_update_rate
        self.per_layer = per_layer
        self.group = group
        self.controller: BalanceController | None = None
        self._metrics: dict[str, float] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.controller = BalanceController(model, bias_update_rate=self.bias_update_rate, group=self.group)

    def on_step_end(self, args, state, control, **kwargs):
        # Called once per optimizer step (after gradient accumulation), right after optimizer.step().
        metrics = self.controller.step()
        self._metrics = {k: v for k, v in metrics.items() if self.per_layer or k.count("/") == 1}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or not self._metrics:
            return  # evaluation logs and the final summary carry no step metrics
        logs.update(self._metrics)
        if state.log_history:  # Trainer stored a copy of `logs` before calling callbacks
            state.log_history[-1].update(self._metrics)

    def on_train_end(self, args, state, control, **kwargs):
        if self.controller is not None:
            self.controller.close()


def add_balance_callback(trainer: Trainer, **options) -> MoEBalanceCallback:
    """Register a `MoEBalanceCallback` ahead of the reporting callbacks and return it."""
    callback = MoEBalanceCallback(**options)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
