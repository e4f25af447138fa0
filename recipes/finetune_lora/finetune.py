"""Fine-tune one PEFT LoRA adapter on one task, with Accelerate or DeepSpeed ZeRO-2, and save it as PEFT does.

MoE bases are patched by moeplug (grouped experts, global-batch balancing); the optimizer is
``moeplug.FP8AdamW`` unless ``--no-fp8``; ``--compress-activations`` keeps saved activations in FP8.
The adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) is what PEFT's
``PeftModel.from_pretrained`` and ``lora-serve --adapter NAME=DIR`` read; ``train_metrics.json`` beside
them holds the loss curve and the held-out loss before and after.

    # one process
    python recipes/finetune_lora/finetune.py --base out/base --task upper --out out/adapters/upper
    # Accelerate, 2 CPU processes (`--cpu --num_processes 2` would silently start only one)
    accelerate launch --multi_gpu --num_processes 2 recipes/finetune_lora/finetune.py --base out/base --task upper --out out/adapters/upper
    # DeepSpeed ZeRO-2 (torchrun works too); the first start compiles a shared-memory op for 30-50 s
    deepspeed --num_gpus 2 recipes/finetune_lora/finetune.py --deepspeed_config recipes/finetune_lora/ds_config.json --base out/base --task upper --out out/adapters/upper
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm

import moeplug
import tasks
from base import SHORTCUTS, load_base

# Linear layers LoRA may adapt, when the model has them (fused MoE experts are not nn.Linear).
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="tiny-mixtral", help=f"one of {SHORTCUTS}, an HF model directory or a .gguf file")
    p.add_argument("--task", required=True, choices=sorted(tasks.TASKS))
    p.add_argument("--out", required=True, type=Path, help="adapter directory to write (replaced atomically)")
    p.add_argument("--text", default=None, help="file of prose lines (default: the standard library's docstrings)")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps")
    p.add_argument("--batch", type=int, default=16, help="sentences per step per process")
    p.add_argument("--max-length", type=int, default=96, help="tokens per sentence, EOS included")
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    p.add_argument("--targets", default=None,
                   help=f"comma-separated module names (default: those of {DEFAULT_TARGETS} the model has)")
    p.add_argument("--expert-lora", action=argparse.BooleanOptionalAction, default=True,
                   help="on MoE bases, LoRA on the fused experts and the router weight too (PEFT target_parameters)")
    p.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=True, help="moeplug.FP8AdamW (default) "
                   "or torch AdamW")
    p.add_argument("--fp8-min-numel", type=int, default=1024, help="smaller tensors keep fp32 moments")
    p.add_argument("--compress-activations", action="store_true", help="moeplug.compress_activations (FP8)")
    p.add_argument("--balance", default="global", help="moeplug balancing of MoE bases: global | micro | hf | ...")
    p.add_argument("--aux-loss-coef", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deepspeed_config", default=None, help="DeepSpeed JSON config: train under DeepSpeed")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "rank", "max_length"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def lora_model(model: torch.nn.Module, args: argparse.Namespace):
    """Patch an MoE base with moeplug (drop-in experts + balancing), then wrap it in a PEFT LoRA model."""
    is_moe = model.config.model_type in moeplug.SUPPORTED_FAMILIES
    report = (moeplug.patch_model(model, balance=args.balance, aux_loss_coef=args.aux_loss_coef) if is_moe
              else f"{model.config.model_type}: dense, not patched")
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = args.targets.split(",") if args.targets else [t for t in DEFAULT_TARGETS if t in present]
    missing = sorted(set(targets) - present)
    if missing or not targets:
        raise SystemExit(f"--targets {targets}: {missing or 'none'} not linear layers of the model "
                         f"(it has {sorted(present)})")
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha or 2 * args.rank, target_modules=targets,
                        target_parameters=expert_parameters(model) if is_moe and args.expert_lora else None,
                        lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(model, config), report, is_moe


def expert_parameters(model: torch.nn.Module) -> list[str]:
    """PEFT `target_parameters` for LoRA on a patched MoE model's experts and routers (e.g. `mlp.experts.down_proj`,
    `mlp.gate.weight`): moeplug trains them as grouped low-rank products, lora-serve serves them per expert."""
    layer = moeplug.moe_modules(model)[0]
    experts, router = (".".join(name.split(".")[-2:]) for name in (layer.experts_name, layer.name))
    return [f"{experts}.gate_up_proj", f"{experts}.down_proj", f"{router}.weight"]


def eval_loss(model, tokenizer, lines: list[str], max_length: int, batch: int = 64) -> float:
    """Mean next-token loss per predicted token of ``lines`` (EOS included), in eval mode."""
    was_training, total, count = model.training, 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(lines), batch):
            inputs = tasks.encode(tokenizer, lines[start : start + batch], max_length)
            tokens = int((inputs["labels"][:, 1:] != -100).sum())
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), inputs["labels"][:, 1:].flatten(),
                                                     ignore_index=-100, reduction="sum")
            total, count = total + loss.item(), count + tokens
    model.train(was_training)
    return total / count


class Launcher:
    """What differs between Accelerate and DeepSpeed: wrapping, backward, stepping, rank, averaging."""

    def __init__(self, args: argparse.Namespace, model, optimizer):
        self.deepspeed = args.deepspeed_config is not None
        if self.deepspeed:
            import deepspeed

            config = json.loads(Path(args.deepspeed_config).read_text())
            config.update(train_micro_batch_size_per_gpu=args.batch, gradient_accumulation_steps=1,
                          zero_allow_untested_optimizer=True)  # FP8AdamW is a client optimizer DeepSpeed does not know
            config.pop("train_batch_size", None)
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
            self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
            self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            self.name = f"deepspeed ZeRO-{self.model.zero_optimization_stage()}"
        else:
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
            self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
            self.name = "accelerate"

    def step(self, loss: torch.Tensor) -> float:
        """Backward, optimizer step, zero grads; returns the loss averaged over processes."""
        if self.deepspeed:
            self.model.backward(loss)
            self.model.step()
        else:
            self.accelerator.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        if self.world > 1:
            torch.distributed.all_reduce(mean)
            mean /= self.world
        return mean.item()

    def barrier(self) -> None:
        """Wait for every process (before the main one writes what they all trained)."""
        if self.world > 1:
            torch.distributed.barrier()


def save_atomically(peft_model, out: Path, metrics: dict) -> None:
    """Write the adapter and its metrics into a temporary directory, then swap it in, so readers never
    see half an adapter."""
    out = out.resolve()
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp))
    (tmp / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> dict:
    """Train one adapter; returns (and writes, on the main process) its metrics."""
    args = parse_args(argv)
    model, tokenizer = load_base(args.base)
    rewrite = tasks.task(args.task)
    train, held_out = tasks.split(tasks.load_sentences(args.text))
    train, held_out = [rewrite(s) for s in train], [rewrite(s) for s in held_out][:256]
    peft_model, report, is_moe = lora_model(model, args)
    loss_before = eval_loss(peft_model, tokenizer, held_out, args.max_length)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = (moeplug.FP8AdamW(trainable, lr=args.lr, weight_decay=0.0, min_quantized_numel=args.fp8_min_numel)
                 if args.fp8 else torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0))
    launcher = Launcher(args, peft_model, optimizer)
    # The hook sits on the innermost torch optimizer, so balancing steps once per real optimizer step.
    controller = moeplug.BalanceController(peft_model, launcher.optimizer) if is_moe else None
    compressor = moeplug.compress_activations(peft_model) if args.compress_activations else None
    main_process = launcher.rank == 0
    if main_process:
        config = peft_model.peft_config["default"]
        print(f"{args.task}: {report}; LoRA r={args.rank} on {sorted(config.target_modules)} "
              f"+ {sorted(config.target_parameters or [])}; "
              f"{sum(p.numel() for p in trainable)} trainable parameters; {launcher.name} on {launcher.world} "
              f"process(es); {'FP8AdamW' if args.fp8 else 'AdamW'}{', FP8 activations' if compressor else ''}")
    data = tasks.batches(train, args.batch, seed=args.seed + launcher.rank)
    losses, start = [], time.perf_counter()
    launcher.model.train()
    for _ in tqdm(range(args.steps), desc=f"adapter {args.task}", disable=not main_process, unit="step"):
        inputs = tasks.encode(tokenizer, next(data), args.max_length)
        losses.append(launcher.step(launcher.model(**inputs).loss))
    seconds = time.perf_counter() - start
    if compressor is not None:
        compressor.remove()
    metrics = {
        "task": args.task, "base": args.base, "steps": args.steps, "batch_per_process": args.batch,
        "processes": launcher.world, "launcher": launcher.name, "optimizer": "FP8AdamW" if args.fp8 else "AdamW",
        "compress_activations": args.compress_activations, "rank": args.rank, "lr": args.lr,
        "train_losses": losses, "train_seconds": seconds,
        "held_out_loss_before": loss_before, "held_out_loss_after": eval_loss(peft_model, tokenizer, held_out,
                                                                              args.max_length),
        "moe": controller.metrics() if controller else None,
    }
    launcher.barrier()
    if main_process:
        save_atomically(peft_model, args.out, metrics)
        print(f"{args.task}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {seconds:.0f} s; held-out loss "
              f"{loss_before:.3f} -> {metrics['held_out_loss_after']:.3f}; wrote {args.out}")
    launcher.barrier()
    return metrics


if __name__ == "__main__":
    main()
