"""Fine-tuning through the server with the official ``openai`` client: upload -> create -> poll -> query.

Oracles: the adapter the job trained equals the adapter a plain PEFT loop trains offline (same data order,
init, optimizer and steps), its per-step losses equal the loop's, and the served fine-tuned model's greedy
completion equals PEFT ``generate`` with that adapter.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file




def test_job_succeeds_and_its_model_is_served(server, finished_job):
    uploaded, job = finished_job
    client = server.openai()
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:base:shout:{job.id}"
    assert job.trained_tokens > 0 and job.training_file == uploaded.id
    assert job.fine_tuned_model in [m.id for m in client.models.list().data]
    assert job.id in [j.id for j in client.fine_tuning.jobs.list().data]
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert any("successfully completed" in e.message for e in events)
    steps = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data]
    assert steps == [9, 8, 6, 4, 2]  # 6 examples / batch 2 = 3 steps per epoch, 3 epochs, one checkpoint every 2


def test_adapter_equals_offline_peft_loop(server, finished_job, ft):
    _, job = finished_job
    records = ft.chat_examples()
    model, losses = ft.peft_loop(server.base, server.tokenizer, records, seed=ft.SEED, r=ft.LORA["r"],
                                 alpha=ft.LORA["alpha"], targets=ft.LORA["target_modules"], n_epochs=ft.HYPER["n_epochs"],
                                 batch_size=ft.HYPER["batch_size"], lr=ft.BASE_LR * ft.HYPER["learning_rate_multiplier"])
    trained = load_file(str(server.root / "jobs" / job.id / "adapter" / "adapter_model.safetensors"))
    expected = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert sorted(trained) == sorted(expected)
    # fp32 on both sides, same op order for the LoRA term; the base forward and its backward sum in other
    # orders (padding masks, SDPA), so gradients differ by ~1e-6 relative, and Adam's normalised step turns
    # that into ~lr * 1e-6 per step on weights that move by lr each step: 1e-5 absolute is ~100x that bound
    # over 9 steps while a wrong mask, order or loss scale moves weights by ~lr = 1e-2.
    for key, value in expected.items():
        torch.testing.assert_close(trained[key], value, rtol=1e-4, atol=1e-5, msg=key)
    events = server.openai().fine_tuning.jobs.list_events(job.id, limit=100).data
    served_losses = [e.data["train_loss"] for e in reversed(events) if e.data and "train_loss" in e.data]
    torch.testing.assert_close(torch.tensor(served_losses), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    # The validation loss of the final checkpoint: transformers' token-mean loss of the validation set
    tokens = [ft.oracle_tokens(server.tokenizer, record) for record in ft.VALID]
    width = max(len(ids) for ids, _ in tokens)
    with torch.no_grad():
        expected_valid = model(input_ids=torch.tensor([i + [0] * (width - len(i)) for i, _ in tokens]),
                               attention_mask=torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in tokens]),
                               labels=torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in tokens])).loss
    final = server.openai().fine_tuning.jobs.checkpoints.list(job.id).data[0]
    assert final.metrics.valid_loss == pytest.approx(expected_valid.item(), rel=1e-4)


def test_served_model_equals_peft_generate(server, finished_job, lora):
    _, job = finished_job
    prompt = server.tokenizer.apply_chat_template([{"role": "user", "content": "cat"}],
                                                  add_generation_prompt=True)["input_ids"]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(server.base), str(server.root / "jobs" / job.id / "adapter"))
    expected = lora.hf_generate(peft_model.eval(), prompt, 12)
    answer = server.openai().completions.create(model=job.fine_tuned_model, prompt=prompt, max_tokens=12,
                                                temperature=0)
    base_answer = server.openai().completions.create(model="base", prompt=prompt, max_tokens=12, temperature=0)
    end = expected.index(2) if 2 in expected else len(expected)  # generation stops at EOS (id 2)
    assert answer.choices[0].text == server.tokenizer.decode(expected[:end])
    assert answer.choices[0].text != base_answer.choices[0].text  # the adapter changed something
