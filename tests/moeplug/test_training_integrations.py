"""Balancing in the training loops people use: HF Trainer (callback) and Accelerate (optimizer hook)."""

from __future__ import annotations

import copy

import torch
from accelerate import Accelerator
from transformers import Trainer, TrainingArguments

import moeplug
from moeplug import BalanceController
from moeplug.integrations.hf_trainer import MoEBalanceCallback
from moeplug.tiny import tiny_model


class _Examples(torch.utils.data.Dataset):
    def __init__(self, count: int, length: int = 12):
        self.ids = torch.randint(3, 96, (count, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_with_gradient_accumulation_logs_global_counts(tmp_path):
    model = tiny_model("mixtral").train()
    initial = copy.deepcopy(model).eval()
    moeplug.patch_model(model, balance="global", aux_loss_coef=0.01)
    data = _Examples(4)
    callback = MoEBalanceCallback()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=4,
                             max_steps=1, logging_steps=1, report_to=[], use_cpu=True, learning_rate=1e-3,
                             save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()

    # Manual oracle: transformers' own routers on the initial weights, top-k counted over the
    # 4 micro-batches of the (only) optimizer step, in whatever order the sampler used.
    manual = {}
    with torch.no_grad():
        for example in data.ids:
            logits = initial(example[None], output_router_logits=True).router_logits
            for layer, layer_logits in enumerate(logits):
                top = torch.softmax(layer_logits, -1).topk(model.config.num_experts_per_tok, -1).indices
                counts = torch.bincount(top.flatten(), minlength=model.config.num_local_experts)
                manual[layer] = manual.get(layer, 0) + counts
    for layer, counts in manual.items():
        torch.testing.assert_close(callback.controller.last_step_counts[f"model.layers.{layer}.mlp.gate"],
                                   counts.double())
    step_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(step_logs) == 1
    expected_ratio = sum(float(c.max() / c.float().mean()) for c in manual.values()) / len(manual)
    assert step_logs[0]["moe/max_over_mean"] == expected_ratio
    assert {"moe/lbl", "moe/entropy", "moe/dead_experts"} <= set(step_logs[0])


def test_accelerate_loop_closes_a_step_per_optimizer_step():
    model = tiny_model("qwen2_moe").train()
    moeplug.patch_model(model, balance="global")
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    controller = BalanceController(accelerator.unwrap_model(model), optimizer)
    ids = torch.randint(3, 96, (8, 2, 10), generator=torch.Generator().manual_seed(0))
    for batch in ids:
        with accelerator.accumulate(model):
            accelerator.backward(model(batch, labels=batch).loss)
            optimizer.step()
            optimizer.zero_grad()
    assert controller.steps == 2  # 8 micro-batches / 4 accumulation steps
    total = sum(c.sum() for c in controller.last_step_counts.values())
    assert total == 4 * 2 * 10 * model.config.num_experts_per_tok * model.config.num_hidden_layers
