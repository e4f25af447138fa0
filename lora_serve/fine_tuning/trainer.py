"""``LoRATrainer``: supervised LoRA fine-tuning on the served model's own weights, one micro-batch at a time.

The co-scheduler (``cosched.py``) calls ``run_micro_batch(max_tokens)`` after an engine step's inference
work with the tokens that step has left; the trainer takes as many examples of the current optimizer batch
as fit, runs forward and backward with its LoRA hooked on (``lora_params.py``) and, once the batch's
``batch_size`` examples are all in, takes one optimizer step. So how the batch is split over engine steps
does not change the result: each example's summed token loss is divided by the whole batch's count of
loss tokens, the loss a PEFT/TRL loop computes on the batch at once.

Data order: epoch ``e`` visits the examples in ``torch.randperm(n, generator=manual_seed(seed + e))`` order,
in batches of ``batch_size`` (the last one of an epoch may be smaller); steps per epoch ``ceil(n / batch_size)``.
The order depends on nothing but the seed, so the step number is the whole data position of a checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moeplug.fp8 import FP8AdamW

from ..paged_attention import ATTENTION_NAME
from .config import OPTIMIZERS
from .data import IGNORE, Example
from .jobs import JobSpec
from .lora_params import LoRAParams, match_targets


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the job fails with this message."""


def data_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The order epoch ``epoch`` visits the examples in (see the module docstring)."""
    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def make_optimizer(params, name: str, lr: float) -> torch.optim.Optimizer:
    """``fp8adamw`` (moeplug's FP8AdamW) or ``adamw`` (torch), betas/eps at their defaults, no weight decay
    (TRL's default for SFT)."""
    if name == "fp8adamw":
        return FP8AdamW(params, lr=lr, weight_decay=0.0)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    raise ValueError(f"optimizer {name!r} is not one of {OPTIMIZERS}")


def pad_batch(examples: list[Example], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = [e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in examples]
    labels = [e.labels + [IGNORE] * (width - len(e.labels)) for e in examples]
    mask = [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in examples]
    return {k: torch.tensor(v, device=device) for k, v in
            (("input_ids", ids), ("attention_mask", mask), ("labels", labels))}


def loss_tokens(example: Example) -> int:
    """Tokens whose prediction the loss covers (labels shifted by one, as a causal LM predicts)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE)


@contextmanager
def training_forward(model: nn.Module) -> Iterator[None]:
    """The served model with standard attention (SDPA) instead of the engine's paged attention, and autograd."""
    model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        model.set_attn_implementation(ATTENTION_NAME)


class LoRATrainer:
    """Trains one job's LoRA on ``model`` (the engine's). ``base_lr`` times the job's multiplier is the lr."""

    def __init__(self, model: nn.Module, spec: JobSpec, train: list[Example], valid: list[Example],
                 optimizer: str, base_lr: float, pad_id: int):
        self.model, self.spec, self.train, self.valid, self.pad_id = model, spec, train, valid, pad_id
        for p in model.parameters():  # only the LoRA trains; the engine never needs base gradients
            p.requires_grad_(False)
        layers = match_targets(model, spec.lora["target_modules"])
        self.lora = LoRAParams(layers, spec.lora["r"], spec.lora["alpha"], spec.seed)
        self.optimizer = make_optimizer(self.lora.parameters(), optimizer, base_lr * spec.learning_rate_multiplier)
        self.steps_per_epoch = math.ceil(len(train) / spec.batch_size)
        self.total_steps = spec.n_epochs * self.steps_per_epoch
        self.step = 0
        self.trained_tokens = 0
        self.last_loss: float | None = None
        self._todo: list[Example] = []  # examples of the current optimizer batch not yet run
        self._batch_loss_tokens = 0
        self._batch_loss = 0.0

    @property
    def done(self) -> bool:
        """Whether every optimizer step has been taken."""
        return self.step >= self.total_steps

    def next_cost(self) -> int:
        """Tokens the smallest next micro-batch (one example) takes."""
        self._start_batch()
        return len(self._todo[0].input_ids)

    def run_micro_batch(self, max_tokens: int) -> int:
        """Forward and backward on the next examples whose padded size fits ``max_tokens`` (at least one);
        an optimizer step when the batch is complete. Returns the tokens run."""
        self._start_batch()
        take, width = 0, 0
        while take < len(self._todo):
            width = max(width, len(self._todo[take].input_ids))
            if take and width * (take + 1) > max_tokens:
                break
            take += 1
        examples, self._todo = self._todo[:take], self._todo[take:]
        batch = pad_batch(examples, self.pad_id, self.model.device)
        with training_forward(self.model), self.lora.attached():
            summed = self._summed_loss(batch)
            if not torch.isfinite(summed):
                raise TrainingError(f"the training loss is {summed.item()} at step {self.step + 1}")
            (summed / self._batch_loss_tokens).backward()
        self._batch_loss += summed.item()
        tokens = sum(len(e.input_ids) for e in examples)
        self.trained_tokens += tokens
        if not self._todo:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.last_loss = self._batch_loss / self._batch_loss_tokens
        return batch["input_ids"].numel()

    def _start_batch(self) -> None:
        if self._todo:
            return
        epoch, index = divmod(self.step, self.steps_per_epoch)
        order = data_order(len(self.train), self.spec.seed, epoch)
        size = self.spec.batch_size
        self._todo = [self.train[i] for i in order[index * size : (index + 1) * size]]
        self._batch_loss_tokens = max(1, sum(loss_tokens(e) for e in self._todo))
        self._batch_loss = 0.0

    def validation_loss(self, batch_examples: int = 8) -> float | None:
        """Mean token loss of the validation examples (None without them)."""
        if not self.valid:
            return None
        total, count = 0.0, 0
        with training_forward(self.model), self.lora.attached(), torch.no_grad():
            for start in range(0, len(self.valid), batch_examples):
                chunk = self.valid[start : start + batch_examples]
                total += self._summed_loss(pad_batch(chunk, self.pad_id, self.model.device)).item()
                count += sum(loss_tokens(e) for e in chunk)
        return total / max(1, count)

    def _summed_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of the token losses of ``batch`` (each position predicts the next label; -100 skipped)."""
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                               ignore_index=IGNORE, reduction="sum")

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: Path, metrics: dict) -> None:
        """Adapter, optimizer and data position (the step) under ``path``, complete once ``meta.json`` exists."""
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.lora.save_peft(tmp / "adapter", self.spec.model)
        torch.save({"optimizer": self.optimizer.state_dict(), "step": self.step,
                    "trained_tokens": self.trained_tokens}, tmp / "trainer.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": self.step, **metrics}))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)

    def load_checkpoint(self, path: Path) -> None:
        """Resume from a checkpoint ``save_checkpoint`` wrote (at an optimizer-step boundary)."""
        self.lora.load_peft(path / "adapter")
        state = torch.load(path / "trainer.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.trained_tokens = state["step"], state["trained_tokens"]
        self._todo = []
