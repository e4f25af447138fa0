"""Train a moeplug-patched MoE under DeepSpeed ZeRO-2 with global-batch balancing.

On this CPU machine (gloo; the first start compiles DeepSpeed's shared-memory op for 30-50 s, kept
in TORCH_EXTENSIONS_DIR):

    torchrun --nproc_per_node 2 recipes/deepspeed/train_moe.py --deepspeed_config recipes/deepspeed/ds_config.json
    deepspeed --num_gpus 2 recipes/deepspeed/train_moe.py --deepspeed_config recipes/deepspeed/ds_config.json

The torch optimizer is created here and handed to DeepSpeed (naming one in the config would compile
fused_adam); `BalanceController` hooks it, so balancing steps once per DeepSpeed optimizer step.
Expert parallelism under DeepSpeed is not wired yet: DeepSpeed recognises expert parameters only in
its own `deepspeed.moe` layers, so `--ep-size` > 1 is refused here (use the Accelerate recipe).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import deepspeed
import torch
from tqdm import tqdm

import moeplug
from moeplug.demo import batches, byte_corpus, demo_model


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="moeplug + DeepSpeed ZeRO MoE training recipe")
    parser.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON config (batch sizes, ZeRO stage)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--balance", default="global", help="micro | sequence | global | none | hf")
    parser.add_argument("--aux-loss-coef", type=float, default=0.01)
    parser.add_argument("--bias-update-rate", type=float, default=0.0)
    parser.add_argument("--ep-size", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--output", default=None, help="directory for summary.json (losses, balance metrics)")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.ep_size != 1:
        raise SystemExit(f"--ep-size {args.ep_size}: expert parallelism under DeepSpeed is not supported yet "
                         "(DeepSpeed only treats deepspeed.moe layers' parameters as expert parameters); "
                         "use recipes/accelerate/train_moe.py for expert parallelism")
    config = json.loads(open(args.deepspeed_config).read())
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    model = demo_model(seed=0)
    report = moeplug.patch_model(model, balance=args.balance, aux_loss_coef=args.aux_loss_coef)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    controller = moeplug.BalanceController(model, ds_optimizer, bias_update_rate=args.bias_update_rate)
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
        engine.step()  # steps the optimizer (and the balancing hook) every gradient_accumulation_steps
        micro_losses.append(loss.item())
        if controller.steps > progress.n:  # an optimizer step just happened
            step_losses.append(sum(micro_losses) / len(micro_losses))
            micro_losses = []
            progress.update(controller.steps - progress.n)
            progress.set_postfix(loss=f"{loss.item():.3f}",
                                 max_over_mean=f"{controller.metrics()['moe/max_over_mean']:.2f}")
    progress.close()
    if rank == 0:
        print({k: round(v, 4) for k, v in controller.metrics().items() if k.count("/") == 1})
        if args.output:
            Path(args.output).mkdir(parents=True, exist_ok=True)
            summary = {"step_losses": step_losses, "metrics": controller.metrics(),
                       "zero_stage": engine.zero_optimization_stage()}
            (Path(args.output) / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
