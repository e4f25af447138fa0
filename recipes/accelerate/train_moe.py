"""Train a moeplug-patched MoE with Accelerate: global-batch balancing, optional expert parallelism.

On this CPU machine (2 processes; `--cpu --num_processes 2` would silently start only one):

    accelerate launch --multi_gpu --num_processes 2 recipes/accelerate/train_moe.py --steps 20
    accelerate launch --multi_gpu --num_processes 2 recipes/accelerate/train_moe.py --steps 20 --ep-size 2

With `--ep-size 1` the model is wrapped by Accelerate (DDP) as usual. With expert parallelism each
rank holds only its experts, so DDP must not average them: the model is left unwrapped and
`moeplug.dispatch.allreduce_gradients` averages gradients (replicated ones over all ranks, expert
shards over their expert-data-parallel group) before each optimizer step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

import moeplug
from moeplug.checkpoint import export_pretrained, save_checkpoint
from moeplug.demo import batches, byte_corpus, demo_model
from moeplug.dispatch import allreduce_gradients


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="moeplug + Accelerate MoE training recipe")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--micro-batches", type=int, default=4, help="gradient accumulation steps")
    parser.add_argument("--batch", type=int, default=4, help="sequences per micro-batch per rank")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--balance", default="global", help="micro | sequence | global | none | hf")
    parser.add_argument("--aux-loss-coef", type=float, default=0.01)
    parser.add_argument("--bias-update-rate", type=float, default=0.0, help="aux-loss-free balancing rate")
    parser.add_argument("--ep-size", type=int, default=1, help="expert-parallel ranks (must divide world size)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--output", default=None, help="directory for a moeplug checkpoint + HF export")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=args.micro_batches)
    model = demo_model(seed=0)
    report = moeplug.patch_model(model, balance=args.balance, aux_loss_coef=args.aux_loss_coef, ep_size=args.ep_size)
    accelerator.print(f"{report} on {accelerator.num_processes} processes")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if args.ep_size == 1:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model = model.to(accelerator.device)
        optimizer = accelerator.prepare(optimizer)
    controller = moeplug.BalanceController(accelerator.unwrap_model(model), optimizer,
                                           bias_update_rate=args.bias_update_rate)
    data = batches(byte_corpus(), args.batch, args.length, seed=accelerator.process_index)
    progress = tqdm(total=args.steps, desc="training", disable=not accelerator.is_main_process)
    step_losses, micro_losses = [], []
    while controller.steps < args.steps:
        ids = next(data).to(accelerator.device)
        with accelerator.accumulate(model):
            loss = model(ids, labels=ids).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.ep_size > 1:
                allreduce_gradients(accelerator.unwrap_model(model))
            optimizer.step()  # Accelerate skips it on accumulation steps; the controller hook fires once per step
            optimizer.zero_grad()
        micro_losses.append(loss.item())
        if accelerator.sync_gradients:
            step_losses.append(sum(micro_losses) / len(micro_losses))
            micro_losses = []
            metrics = controller.metrics()
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}", max_over_mean=f"{metrics['moe/max_over_mean']:.2f}")
    progress.close()
    accelerator.print({k: round(v, 4) for k, v in controller.metrics().items() if k.count("/") == 1})
    if args.output:
        unwrapped = accelerator.unwrap_model(model)
        save_checkpoint(unwrapped, f"{args.output}/moeplug", optimizer)  # with the optimizer state, to resume
        export_pretrained(unwrapped, f"{args.output}/hf")
        if accelerator.is_main_process:
            summary = {"step_losses": step_losses, "metrics": controller.metrics(), "ranks": accelerator.num_processes}
            (Path(args.output) / "summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(f"saved {args.output}/moeplug (sharded), {args.output}/hf (transformers), summary.json")


if __name__ == "__main__":
    main()
