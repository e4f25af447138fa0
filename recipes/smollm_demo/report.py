"""What the demo measures and prints: held-out losses (PEFT), task scores of the served answers, expert
loads, the training-curve plot and the Markdown tables."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

import tasks
from model import ExpertLoad, imbalance
from train import answer_loss


def _active(peft_model, model_name: str):
    """Context in which ``peft_model`` computes as ``model_name`` (``"base"``: every adapter disabled)."""
    if model_name == "base":
        return peft_model.disable_adapter()
    peft_model.set_adapter(model_name)
    return contextlib.nullcontext()


def loss_matrix(peft_model, tokenizer, held_out, models: list[str], batch: int = 8) -> dict[str, dict[str, float]]:
    """Held-out answer loss per token of each model (``base`` or an adapter, applied by PEFT) on each task."""
    result = {}
    with torch.no_grad():
        for model_name in models:
            with _active(peft_model, model_name):
                result[model_name] = {task: _mean_loss(peft_model, tokenizer, task, held_out, batch)
                                      for task in tasks.TASKS}
    return result


def _mean_loss(model, tokenizer, task: str, passages, batch: int) -> float:
    total, count = 0.0, 0
    for start in range(0, len(passages), batch):
        encoded = tasks.encode(tokenizer, [tasks.example(task, p) for p in passages[start : start + batch]])
        loss, _, n = answer_loss(model, encoded)
        total, count = total + loss.item() * n, count + n
    return total / count


def expert_loads(model, tokenizer, passages, models: list[str] | None = None,
                 batch: int = 8) -> dict[str, torch.Tensor]:
    """Per-layer expert load shares ``[layers, experts]`` on the held-out prompts, per model (PEFT) or for ``model``."""
    load = ExpertLoad(model)
    encoded = [tasks.encode(tokenizer, [(tasks.prompt(p), "") for p in passages[i : i + batch]])
               for i in range(0, len(passages), batch)]

    def forward(b):
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
              logits_to_keep=1)

    result = {}
    for name in models or ["model"]:
        with _active(model, name) if models else contextlib.nullcontext():
            result[name] = load.measure(forward, encoded)
    return result


def scores(answers: dict[str, dict[str, str]], references: dict[str, list[str]]) -> dict[str, dict[str, dict]]:
    """``{task: {model: {"exact": .., "f1": ..}}}``: each task's adapter and the base on that task's references."""
    result = {}
    for task, refs in references.items():
        result[task] = {}
        for model in ("base", task):
            preds = answers[model]
            result[task][model] = {
                "exact": sum(map(tasks.exact_match, preds, refs)) / len(refs),
                "f1": sum(map(tasks.token_f1, preds, refs)) / len(refs),
            }
    return result


def loss_table(losses: dict[str, dict[str, float]]) -> str:
    """Markdown: rows are models, columns tasks, the best (lowest) loss per task in bold."""
    names = list(tasks.TASKS)
    best = {t: min(losses, key=lambda m: losses[m][t]) for t in names}
    rows = ["| model | " + " | ".join(f"loss on {t}" for t in names) + " |", "|---" * (len(names) + 1) + "|"]
    for model, row in losses.items():
        cells = [f"**{row[t]:.3f}**" if best[t] == model else f"{row[t]:.3f}" for t in names]
        rows.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def score_table(task_scores: dict[str, dict[str, dict]], n: int) -> str:
    """Markdown: per task, exact match and token F1 of the base and of the task's adapter on ``n`` served prompts."""
    rows = [f"| task ({n} held-out prompts) | base exact | adapter exact | base token F1 | adapter token F1 |",
            "|---|---|---|---|---|"]
    for task, s in task_scores.items():
        rows.append(f"| {task} | {s['base']['exact']:.2f} | {s[task]['exact']:.2f} | {s['base']['f1']:.2f} | "
                    f"{s[task]['f1']:.2f} |")
    return "\n".join(rows)


def load_table(loads: dict[str, torch.Tensor]) -> str:
    """Markdown: per model, the mean busiest/mean load ratio and the shares in the first, middle and last layer."""
    layers = next(iter(loads.values())).shape[0]
    picks = [0, layers // 2, layers - 1]
    rows = ["| routers / model | busiest / mean (avg over layers) | " + " | ".join(f"layer {i} shares" for i in picks)
            + " |", "|---" * (2 + len(picks)) + "|"]
    for name, shares in loads.items():
        cells = [" ".join(f"{x:.2f}" for x in shares[i].tolist()) for i in picks]
        rows.append(f"| {name} | {imbalance(shares):.2f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_curves(curves: dict[str, list[float]], path: Path) -> None:
    """Loss per optimizer step (running mean of 3) to a PNG: the routers' balancing loss left, each adapter's
    answer loss right."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, losses in curves.items():
        values = torch.tensor(losses)
        window = min(3, len(values))
        smooth = torch.nn.functional.avg_pool1d(values[None, None], window, 1).flatten()
        (left if name == "routers" else right).plot(range(window, len(values) + 1), smooth.tolist(), label=name)
    left.set_title("routers: global-batch balancing loss (sum of layers)")
    right.set_title("LoRA adapters: training answer loss per token")
    for ax in (left, right):
        ax.set_xlabel("optimizer step (running mean of 3)")
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct upcycled to MoE (4 experts, top-2)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
