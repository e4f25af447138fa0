"""Training stages of the demo: the routers (shared by every adapter), then one LoRA adapter per task.

Both run on the moeplug-patched upcycled model (``balance="global"``: the load-balancing loss is taken over
the optimizer step's whole batch, with a ``BalanceController`` on the optimizer) with ``moeplug.FP8AdamW``.
What LoRA adapts is set by the two lists below: attention and the experts (PEFT's ``target_parameters`` on
the fused expert weights, which moeplug trains as grouped low-rank products and lora-serve serves per expert).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm import tqdm

import moeplug
import tasks

# LoRA on attention of the top LORA_LAYERS layers: backward stops below the lowest adapted layer, so fewer
# layers make a step much cheaper on a CPU, and the top layers are enough for a new answer format.
ATTENTION_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
# The experts too (PEFT target_parameters on the fused expert weights; [] adapts attention only).
EXPERT_TARGET_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
LORA_LAYERS = 8


@dataclass
class TrainConfig:
    """Options of both stages."""

    router_steps: int = 12
    adapter_steps: int = 25
    batch: int = 4
    rank: int = 16
    lr: float = 3e-3
    router_lr: float = 3e-3
    aux_loss_coef: float = 0.01
    seed: int = 0
    curves: dict[str, list[float]] = field(default_factory=dict)


def lora_config(model, rank: int) -> LoraConfig:
    """The adapters' LoRA: attention and experts of the top ``LORA_LAYERS`` layers."""
    layers = list(range(model.config.num_hidden_layers - LORA_LAYERS, model.config.num_hidden_layers))
    expert_params = [f"layers.{i}.{name}" for i in layers for name in EXPERT_TARGET_PARAMETERS]
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=ATTENTION_TARGET_MODULES,
                      layers_to_transform=layers, target_parameters=expert_params or None, task_type="CAUSAL_LM")


def answer_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """``(mean next-token loss on the answers, moeplug's balancing loss or None, answer tokens)``."""
    keep = batch["keep"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=keep)
    labels = batch["labels"][:, -keep + 1 :]  # logits at position t predict token t+1
    loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
    return loss, getattr(out, "aux_loss", None), int((labels != -100).sum())


def _train(model, params, lr: float, steps: int, data, desc: str, loss_fn) -> list[float]:
    """``steps`` FP8AdamW steps over ``data``; ``loss_fn(model, batch)`` gives (loss to minimise, loss to show).

    A tqdm bar shows the shown loss and tokens/s; the shown losses are returned as the curve.
    """
    optimizer = moeplug.FP8AdamW(params, lr=lr, weight_decay=0.0)
    controller = moeplug.BalanceController(model, optimizer)  # global-batch balancing: counts per optimizer step
    losses, tokens, start = [], 0, time.perf_counter()
    model.train()
    with tqdm(range(steps), desc=desc, unit="step", leave=True) as bar:
        for _ in bar:
            batch = next(data)
            loss, shown = loss_fn(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(shown.item())
            tokens += int(batch["attention_mask"].sum())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
    model.eval()
    controller.close()  # eval forwards need no step accounting
    return losses


def _answer_plus_balance(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    loss, aux, _ = answer_loss(model, batch)
    return (loss + aux if aux is not None else loss), loss


def _balance_only(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=1)
    return out.aux_loss, out.aux_loss


def _encoded(tokenizer, task_names: list[str], passages, batch: int, seed: int):
    """Endless encoded batches of (task, passage) pairs drawn at random."""
    items = [(t, p) for p in passages for t in task_names]
    for chunk in tasks.batches(items, batch, seed):
        yield tasks.encode(tokenizer, [tasks.example(t, p) for t, p in chunk])


def train_routers(model, tokenizer, train, cfg: TrainConfig) -> list[float]:
    """Train only the routers, on the global-batch balancing loss over all tasks' prompts; returns the loss curve.

    The result is the base every adapter (and lora-serve) uses. The upcycled experts are identical copies and
    the top-k weights sum to 1, so the answer loss has no gradient for the routers (any routing gives the same
    output); the balancing loss is all that moves them. It depends on each router's weight and its input only,
    so the inputs are detached and a step costs one forward pass instead of a backward through all 30 layers.
    """
    routers = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("mlp.gate.weight"))
    hooks = [r.register_forward_pre_hook(lambda module, args: (args[0].detach(), *args[1:])) for r in routers]
    try:
        data = _encoded(tokenizer, list(tasks.TASKS), train, cfg.batch, cfg.seed)
        losses = _train(model, [r.weight for r in routers], cfg.router_lr, cfg.router_steps, data, "routers",
                        _balance_only)
    finally:
        for h in hooks:
            h.remove()
        for r in routers:
            r.weight.requires_grad_(False)
    return losses


def train_adapters(model, tokenizer, train, cfg: TrainConfig) -> tuple[PeftModel, dict[str, list[float]]]:
    """One LoRA adapter per task in one PeftModel (``adapter name == task name``); returns it and the loss curves."""
    peft_model, curves = None, {}
    for i, name in enumerate(tasks.TASKS):
        config = lora_config(model, cfg.rank)
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        peft_model.set_adapter(name)  # trains this adapter only; the others stay frozen
        params = [p for p in peft_model.parameters() if p.requires_grad]
        data = _encoded(tokenizer, [name], train, cfg.batch, cfg.seed + 1 + i)
        curves[name] = _train(peft_model, params, cfg.lr, cfg.adapter_steps, data, f"adapter {name}",
                              _answer_plus_balance)
    return peft_model, curves
