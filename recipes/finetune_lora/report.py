"""Evaluate the base and each adapter on every task, and write the table and the training-curve plot."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel

import tasks
from finetune import eval_loss


def loss_matrix(base_spec: str, adapters: dict[str, Path], task_names: list[str], text: str | None,
                max_length: int = 96, limit: int = 128) -> dict[str, dict[str, float]]:
    """Held-out loss of the base (``"base"``) and of each adapter alone, on each task: ``{model: {task: loss}}``.

    Each adapter is applied by PEFT itself (``PeftModel.from_pretrained``), the oracle lora-serve is checked
    against; the base is the unpatched transformers model.
    """
    from base import load_base

    _, held_out = tasks.split(tasks.load_sentences(text))
    held_out = held_out[:limit]
    texts = {name: [tasks.task(name)(s) for s in held_out] for name in task_names}
    model, tokenizer = load_base(base_spec)
    result = {"base": {t: eval_loss(model, tokenizer, lines, max_length) for t, lines in texts.items()}}
    peft_model = None
    for name, path in adapters.items():
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
        else:
            peft_model.load_adapter(str(path), adapter_name=name)
        peft_model.set_adapter(name)
        result[name] = {t: eval_loss(peft_model, tokenizer, lines, max_length) for t, lines in texts.items()}
    return result


def markdown_table(losses: dict[str, dict[str, float]], samples: dict[str, str] | None = None) -> str:
    """The loss matrix as Markdown (best model per task in bold), with a sample completion per model."""
    task_names = list(next(iter(losses.values())))
    best = {t: min(losses, key=lambda m: losses[m][t]) for t in task_names}
    header = "| model | " + " | ".join(f"loss on {t}" for t in task_names) + (" | sample completion |" if samples else " |")
    rule = "|---" * (len(task_names) + 1 + bool(samples)) + "|"
    rows = []
    for model, row in losses.items():
        cells = [f"**{row[t]:.3f}**" if best[t] == model else f"{row[t]:.3f}" for t in task_names]
        sample = [f"`{samples[model]!r}`"] if samples else []
        rows.append("| " + " | ".join([model, *cells, *sample]) + " |")
    return "\n".join([header, rule, *rows])


def plot_curves(metrics: dict[str, dict], path: Path) -> None:
    """Training loss per step of each adapter (and its held-out loss before/after as markers) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, m in metrics.items():
        losses = torch.tensor(m["train_losses"])
        window = min(5, len(losses))
        smooth = torch.nn.functional.avg_pool1d(losses[None, None], window, 1).flatten()  # running mean
        (line,) = ax.plot(range(window, len(losses) + 1), smooth.tolist(), label=f"{name} (train, running mean)")
        ax.plot([0, len(losses)], [m["held_out_loss_before"], m["held_out_loss_after"]], "o--",
                color=line.get_color(), alpha=0.6, label=f"{name} held-out before/after")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per token")
    ax.set_title("LoRA fine-tuning, one adapter per task")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_metrics(adapters: dict[str, Path]) -> dict[str, dict]:
    """The ``train_metrics.json`` finetune.py wrote beside each adapter."""
    return {name: json.loads((Path(path) / "train_metrics.json").read_text()) for name, path in adapters.items()}
