"""ZeRO-Offload (offload_optimizer: cpu) with FP8AdamW against the same run with DeepSpeedCPUAdam, and a
checkpoint resume. Run by test_fp8_deepspeed.py under torchrun-style env vars (one process per rank);
prints one JSON line per rank.

Usage: python deepspeed_offload.py STAGE EP_SIZE CHECKPOINT_DIR

A tiny Mixtral (4 experts; expert-parallel over EP_SIZE ranks through moeplug.integrations.deepspeed) learns
token sequences that count up by one. Both optimizers start from the same weights and see the same batches.
With EP_SIZE 1 the FP8AdamW run also saves a checkpoint halfway, and a fresh engine loads it and trains the
second half again (DeepSpeed's engine checkpoint refuses moeplug's expert-parallel layout, see
moeplug.integrations.deepspeed).
"""

import json
import sys

import deepspeed
import torch
from deepspeed.ops.adam import DeepSpeedCPUAdam

from moeplug.fp8 import FP8AdamW
from moeplug.integrations import deepspeed as mds
from moeplug.tiny import tiny_model

STAGE, EP_SIZE, CKPT = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
STEPS, SAVE_AT, LR, WEIGHT_DECAY, BATCH, LENGTH = 24, 12, 3e-3, 0.01, 4, 16


def make_engine(kind: str):
    model = tiny_model("mixtral", num_local_experts=4).train()
    mds.patch_model(model, ep_size=EP_SIZE, balance="micro", aux_loss_coef=0.01)
    groups = mds.param_groups(model)
    if kind == "fp8":
        optimizer = FP8AdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY)
    else:
        optimizer = DeepSpeedCPUAdam(groups, lr=LR, weight_decay=WEIGHT_DECAY, adamw_mode=True)
    config = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
              "zero_optimization": {"stage": STAGE, "offload_optimizer": {"device": "cpu"}}}
    engine, *_ = mds.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def batch(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + deepspeed.comm.get_rank())
    return (torch.randint(3, 96, (BATCH, 1), generator=gen) + torch.arange(LENGTH)) % 93 + 3


def train(engine, steps: range) -> list[float]:
    losses = []
    for step in steps:
        ids = batch(step)
        loss = engine(ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)
        losses.append(mean.item() / torch.distributed.get_world_size())
    return losses


def weights(engine) -> list[torch.Tensor]:
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=STAGE == 3):
        return [p.detach().clone() for p in params]


def optimizer_state(engine) -> dict:
    """What DeepSpeed hands the inner optimizer: its class, partition sizes and moment bytes per value."""
    inner = engine.optimizer.optimizer
    parts = list(inner.state)  # ZeRO-3 swaps its sub-group partitions in and out of param_groups
    state_bytes = sum(v.numel() * v.element_size() for p in parts for k, v in inner.state[p].items()
                      if torch.is_tensor(v) and k != "step")
    return {"class": type(inner).__name__, "devices": sorted({p.device.type for p in parts}),
            "numel": sum(p.numel() for p in parts), "bytes_per_param": state_bytes / sum(p.numel() for p in parts)}


deepspeed.init_distributed(dist_backend="gloo")
result = {"rank": deepspeed.comm.get_rank()}
reference = make_engine("ds_cpu_adam")
result["ds_losses"] = train(reference, range(STEPS))
result["ds_state"] = optimizer_state(reference)
fp8 = make_engine("fp8")
result["fp8_losses"] = train(fp8, range(SAVE_AT))
if EP_SIZE == 1:
    fp8.save_checkpoint(CKPT, tag="half")
result["fp8_losses"] += train(fp8, range(SAVE_AT, STEPS))
result["fp8_state"] = optimizer_state(fp8)
if EP_SIZE == 1:
    resumed = make_engine("fp8")
    resumed.load_checkpoint(CKPT, tag="half")
    result["resumed_losses"] = train(resumed, range(SAVE_AT, STEPS))
    result["resumed_identical"] = all(torch.equal(a, b) for a, b in zip(weights(fp8), weights(resumed)))
print(json.dumps(result))
