"""DeepSpeed ZeRO-1/2 with FP8AdamW as client optimizer: checkpoint, reload, resume. Run by
test_fp8_deepspeed.py under torchrun-style env vars (one process per rank); prints one JSON line per rank.

Usage: python deepspeed_resume.py STAGE CHECKPOINT_DIR
"""

import json
import sys

import deepspeed
import torch

from moeplug.fp8 import FP8AdamW

STAGE, CKPT = int(sys.argv[1]), sys.argv[2]
CONFIG = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": STAGE},
    "zero_allow_untested_optimizer": True,  # a client optimizer DeepSpeed does not know by name
}


def engine():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 37))
    eng, *_ = deepspeed.initialize(model=model, optimizer=FP8AdamW(model.parameters(), lr=1e-2), config=CONFIG)
    return eng


def train(eng, steps, seed):
    gen = torch.Generator().manual_seed(seed * 100 + deepspeed.comm.get_rank())
    for _ in range(steps):
        loss = eng(torch.randn(4, 64, generator=gen)).pow(2).mean()
        eng.backward(loss)
        eng.step()


def flat_params(eng):
    return torch.cat([p.detach().reshape(-1) for p in eng.module.parameters()])


first = engine()
train(first, 3, seed=1)
first.save_checkpoint(CKPT, tag="t")
train(first, 3, seed=2)

second = engine()
second.load_checkpoint(CKPT, tag="t")
inner = second.optimizer.optimizer  # the FP8AdamW DeepSpeed wraps, holding this rank's flat partition
partition = inner.param_groups[0]["params"][0]
state = inner.state[partition]
train(second, 3, seed=2)

print(json.dumps({
    "rank": deepspeed.comm.get_rank(),
    "identical": bool(torch.equal(flat_params(first), flat_params(second))),
    "partition_numel": partition.numel(),
    "codes_dtype": str(state["exp_avg"].dtype),
    "codes_numel": state["exp_avg"].numel(),
    "amax_numel": state["exp_avg_amax"].numel(),
    "k16_dtype": str(state["exp_avg_sq_k16"].dtype),
    "step": float(state["step"]),
}))
