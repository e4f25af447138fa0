"""Train a moeplug-patched MoE under DeepSpeed ZeRO-1/2 with global-batch balancing and expert parallelism.

On this CPU machine (gloo; the first start compiles DeepSpeed's shared-memory op for 30-50 s, kept
in TORCH_EXTENSIONS_DIR):

    torchrun --nproc_per_node 2 recipes/deepspeed/train_moe.py --deepspeed_config recipes/deepspeed/ds_config.json
    torchrun --nproc_per_node 2 recipes/deepspeed/train_moe.py --deepspeed_config recipes/deepspeed/ds_config.json \
        --ep-size 2 --output out/ds-ep2
    deepspeed --num_gpus 2 recipes/deepspeed/train_moe.py --deepspeed_config recipes/deepspeed/ds_config.json \
        --ep-size 2

With `--ep-size N` each rank holds 1/N of every layer's experts; `moeplug.integrations.deepspeed`
shards them over DeepSpeed's own expert-parallel groups and registers them as DeepSpeed expert
parameters, so ZeRO keeps them in their own param groups and averages their gradients over the
expert-data-parallel group only. ZeRO stage 3 with `--ep-size` > 1 is refused (see that module).
The torch optimizer is created here and handed to DeepSpeed (naming one in the config would compile
fused_adam); `BalanceController` hooks it, so balancing steps once per DeepSpeed optimizer step.
`--output` writes a moeplug sharded checkpoint and a plain transformers export (DeepSpeed's own
`save_checkpoint` does not know moeplug's expert layout).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import deepspeed
import torch
from tqdm import tqdm

import moeplug
from moeplug.checkpoint import export_pretrained, save_checkpoint
from moeplug.demo import batches, byte_corpus, demo_model
from moeplug.integrations import deepspeed as moeplug_deepspeed


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="moeplug + DeepSpeed ZeRO MoE training recipe")
    parser.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON config (batch sizes, ZeRO stage)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--balance", default="global", help="micro | sequence | global | none | hf")
    parser.add_argument("--aux-loss-coef", type=float, default=0.01)
    parser.add_argument("--bias-update-rate", type=float, default=0.0)
    parser.add_argument("--ep-size", type=int, default=1, help="expert-parallel ranks (must divide world size)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--output", default=None,
                        help="directory for summary.json, a moeplug checkpoint (moeplug/) and an HF export (hf/)")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    config = json.loads(open(args.deepspeed_config).read())
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    model = demo_model(seed=0)
    report = moeplug_deepspeed.patch_model(model, balance=args.balance, aux_loss_coef=args.aux_loss_coef,
                                           ep_size=args.ep_size)
    # Expert shards go to their own param groups (DeepSpeed reduces them over the expert-data-parallel group).
    optimizer = torch.optim.AdamW(moeplug_deepspeed.param_groups(model), lr=args.lr)
    engine, *_ = moeplug_deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    # Hooked on the torch optimizer inside the engine: it closes each balancing step once, although ZeRO-1/2
    # call step() once per param group (expert parameters have their own).
    controller = moeplug.BalanceController(model, optimizer, bias_update_rate=args.bias_update_rate)
    rank = torch.distributed.get_rank()
    if rank == 0:
        print(f"{report}; ZeRO stage {engine.zero_optimization_stage()} on {torch.distributed.get_world_size()} ranks")
    data = batches(byte_corpus(), engine.train_micro_batch_size_per_gpu(), args.length, seed=rank)
    progress = tqdm(total=args.steps, desc="training", disable=rank != 0)
    step_losses, micro_losses = [], []
    while controller.steps < args.steps:
        ids = next(data).to(engine.device)
        loss = engine(ids, labels=ids).loss
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()  # steps the optimizer every gradient_accumulation_steps micro-batches
        micro_losses.append(loss.item())
        if boundary:  # an optimizer step just happened
            step_losses.append(sum(micro_losses) / len(micro_losses))
            micro_losses = []
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}",
                                 max_over_mean=f"{controller.metrics()['moe/max_over_mean']:.2f}")
    progress.close()
    if rank == 0:
        print({k: round(v, 4) for k, v in controller.metrics().items() if k.count("/") == 1})
    if args.output:
        save_checkpoint(model, f"{args.output}/moeplug")  # collective: every rank writes its experts
        export_pretrained(model, f"{args.output}/hf")
        if rank == 0:
            summary = {"step_losses": step_losses, "metrics": controller.metrics(), "ep_size": args.ep_size,
                       "zero_stage": engine.zero_optimization_stage(), "has_moe_layers": engine.has_moe_layers,
                       "ranks": torch.distributed.get_world_size()}
            (Path(args.output) / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
