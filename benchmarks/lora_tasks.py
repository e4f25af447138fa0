"""Realistic LoRAs for the compression benchmark: many adapters trained briefly on distinct synthetic tasks.

Task ``t`` belongs to family ``t % families``; a family has its own 64-token sub-vocabulary and each task
its own successor rule on it (a permutation): a sequence starts at a random family token and follows the
rule with probability 0.8, else jumps to a random family token. An adapter learns the family's vocabulary
(shared with its siblings) and its task's rule (its own), so compression has real structure to find and
real task-specific behaviour to keep. ``sibling_loss`` measures the latter: a sibling's adapter on this
task's data.

Training is vectorised: all adapters of a chunk train together in one forward of the base model, each
batch row with its own adapter (LoRA factors stacked ``[n, r, in]`` / ``[n, out, r]``; ranks mixed by zero
padding, which Adam keeps at zero). Adapters are written as PEFT directories (PEFT's own config file) and
cached: ``ensure_adapters`` reuses a directory whose ``tasks.json`` matches.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn

VOCAB_SLICE = 64
FOLLOW = 0.8
# Measured on 32 adapters (tiny base, 20 steps): lr 0.02 gave the most task-specific gain (own task vs a
# sibling's adapter); 0.05 learnt the family vocabulary as well but no rule; q/v alone learnt neither.
CONFIG = {"targets": ["q_proj", "v_proj", "down_proj"], "ranks": [8, 16], "families": 8, "rows": 1, "length": 32,
          "steps": 20, "lr": 0.02, "chunk": 100, "eval_rows": 4}


def tiny_base() -> nn.Module:
    """P2's seeded tiny Llama with its weight matrices scaled by 4: at HF's init (std 0.02) its output layer
    cannot move logits by more than ~0.6 nats for a 64-token vocabulary, so no adapter could learn a task."""
    from lora_serving import base_model  # sibling script: the P2 harness

    base = base_model("tiny")
    with torch.no_grad():
        for p in base.parameters():
            if p.dim() > 1:
                p.mul_(4)
    return base


def task_batch(t: int, families: int, vocab: int, rows: int, length: int, seed: int) -> torch.Tensor:
    """``rows`` sequences of ``length`` tokens of task ``t`` (module docstring), from generator ``seed``."""
    family = torch.randperm(vocab - 3, generator=torch.Generator().manual_seed(10_000 + t % families))[:VOCAB_SLICE] + 3
    rule = torch.randperm(VOCAB_SLICE, generator=torch.Generator().manual_seed(20_000 + t))
    g = torch.Generator().manual_seed(seed)
    state = torch.randint(0, VOCAB_SLICE, (rows,), generator=g)
    out = [state]
    for _ in range(length - 1):
        jump = torch.randint(0, VOCAB_SLICE, (rows,), generator=g)
        state = torch.where(torch.rand(rows, generator=g) < FOLLOW, rule[state], jump)
        out.append(state)
    return family[torch.stack(out, 1)]


class StackedLoRA(nn.Module):
    """``y = base(x) + scale_i · x A_i^T B_i^T`` with rows ``[n * b, L, in]`` laid out adapter-major."""

    def __init__(self, base: nn.Linear, ranks: list[int], generator: torch.Generator):
        super().__init__()
        self.base, n, top = base, len(ranks), max(ranks)
        a = torch.zeros(n, top, base.in_features)
        for i, r in enumerate(ranks):  # PEFT's default init: kaiming-uniform A, zero B
            bound = 1 / base.in_features**0.5
            a[i, :r] = (torch.rand(r, base.in_features, generator=generator) * 2 - 1) * bound
        self.a = nn.Parameter(a)
        self.b = nn.Parameter(torch.zeros(n, base.out_features, top))
        self.scale = 2.0  # lora_alpha = 2 r
        self.override: tuple[torch.Tensor, torch.Tensor] | None = None  # (A, B) to evaluate instead

    def forward(self, x):
        a, b = self.override or (self.a, self.b)
        rows = x.reshape(a.shape[0], -1, x.shape[-1])
        return self.base(x) + (self.scale * (rows @ a.transpose(1, 2)) @ b.transpose(1, 2)).view(*x.shape[:-1], -1)


def _wrap(model: nn.Module, targets: list[str], ranks: list[int], seed: int) -> dict[str, StackedLoRA]:
    g = torch.Generator().manual_seed(seed)
    wrapped = {}
    for name, module in list(model.named_modules()):
        if name.split(".")[-1] in targets and isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            wrapped[name] = StackedLoRA(module, ranks, g)
            setattr(model.get_submodule(parent), child, wrapped[name])
    return wrapped


def mean_loss(model: nn.Module, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Per-adapter mean next-token loss of ``ids [n * b, L]`` (adapter-major rows)."""
    logits = model(input_ids=ids).logits[:, :-1]
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return loss.view(n, -1).mean(1)


def train_chunk(base: nn.Module, tasks: list[int], ranks: list[int], cfg: dict) -> dict[str, tuple]:
    """Train one adapter per task together; return module -> (A [n, R, in], B [n, out, R]) detached."""
    model = copy.deepcopy(base).train()
    for p in model.parameters():
        p.requires_grad_(False)
    layers = _wrap(model, cfg["targets"], ranks, seed=tasks[0])
    params = [p for layer in layers.values() for p in (layer.a, layer.b)]
    optimizer = torch.optim.Adam(params, lr=cfg["lr"])
    vocab = base.config.vocab_size
    for step in range(cfg["steps"]):
        ids = torch.cat([task_batch(t, cfg["families"], vocab, cfg["rows"], cfg["length"], seed=step * 7919 + t) for t in tasks])
        loss = mean_loss(model, ids, len(tasks)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {name: (layer.a.detach(), layer.b.detach()) for name, layer in layers.items()}


def ensure_adapters(base: nn.Module, root: Path, n: int, cfg: dict) -> list[str]:
    """PEFT directories ``root/task{i}`` of ``n`` adapters trained per ``cfg``; trained only if not cached."""
    stamp = {**cfg, "n": n}
    if (root / "tasks.json").exists() and json.loads((root / "tasks.json").read_text())["config"] == stamp:
        return [str(root / f"task{i}") for i in range(n)]
    root.mkdir(parents=True, exist_ok=True)
    template = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=cfg["targets"]))
    template.save_pretrained(root / "template")
    config = json.loads((root / "template" / "adapter_config.json").read_text())
    ranks = [cfg["ranks"][i % len(cfg["ranks"])] for i in range(n)]
    start = time.perf_counter()
    for lo in range(0, n, cfg["chunk"]):
        tasks = list(range(lo, min(n, lo + cfg["chunk"])))
        trained = train_chunk(base, tasks, [ranks[t] for t in tasks], cfg)
        for j, t in enumerate(tasks):
            r = ranks[t]
            tensors = {}
            for module, (a, b) in trained.items():
                tensors[f"base_model.model.{module}.lora_A.weight"] = a[j, :r].contiguous()
                tensors[f"base_model.model.{module}.lora_B.weight"] = b[j, :, :r].contiguous()
            path = root / f"task{t}"
            path.mkdir(exist_ok=True)
            (path / "adapter_config.json").write_text(json.dumps({**config, "r": r, "lora_alpha": 2 * r}))
            save_file(tensors, str(path / "adapter_model.safetensors"))
        print(f"trained adapters {tasks[0]}..{tasks[-1]} ({time.perf_counter() - start:.0f} s)", flush=True)
    (root / "tasks.json").write_text(json.dumps({"config": stamp, "train_s": time.perf_counter() - start}))
    return [str(root / f"task{i}") for i in range(n)]


@torch.no_grad()
def held_out_losses(base: nn.Module, factors: dict[str, tuple], task_of_rows: list[int], cfg: dict) -> list[float]:
    """Held-out loss of adapter ``j`` (``factors``: module -> ``A [n, R, in]``, ``B [n, out, R]`` with the LoRA
    scale folded into B) on fresh data of task ``task_of_rows[j]``, in chunks of ``cfg["chunk"]`` adapters."""
    losses = []
    for lo in range(0, len(task_of_rows), cfg["chunk"]):
        rows = task_of_rows[lo : lo + cfg["chunk"]]
        model = copy.deepcopy(base).eval()
        for name, layer in _wrap(model, cfg["targets"], [1] * len(rows), seed=0).items():
            a, b = factors[name]
            layer.override, layer.scale = (a[lo : lo + len(rows)], b[lo : lo + len(rows)]), 1.0
        ids = torch.cat([task_batch(t, cfg["families"], base.config.vocab_size, cfg["eval_rows"], cfg["length"],
                                    seed=10**9 + t) for t in rows])
        losses += mean_loss(model, ids, len(rows)).tolist()
    return losses
