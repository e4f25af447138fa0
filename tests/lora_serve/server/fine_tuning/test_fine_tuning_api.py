"""Fine-tuning through the server with the official ``openai`` client: upload -> create -> poll -> query.

Oracles: the adapter the job trained equals the adapter a plain PEFT loop trains offline (same data order,
init, optimizer and steps), its per-step losses equal the loop's, and the served fine-tuned model's greedy
completion equals PEFT ``generate`` with that adapter.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from lora_serve import Engine, EngineConfig
from lora_serve.fine_tuning import FineTuningConfig

BASE_LR = 1e-3
HYPER = {"n_epochs": 3, "batch_size": 2, "learning_rate_multiplier": 10.0}
LORA = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}
SEED = 3


def wait_finished(client, job_id: str, timeout: float = 120):
    """Poll the job as a client would until it has finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish within {timeout} s: {job}")


@pytest.fixture(scope="module")
def server(lora, serve, tmp_path_factory):
    """A served tiny Llama with fine-tuning enabled (one engine for this module's tests)."""
    tokenizer = serve.char_tokenizer()
    base = lora.tiny_model("llama")
    engine = Engine(copy.deepcopy(base), tokenizer, EngineConfig(pool_slots=6000, max_batch_tokens=256))
    fine_tuning = FineTuningConfig(root=tmp_path_factory.mktemp("ft"), max_file_bytes=4096, checkpoint_every=2,
                                   base_learning_rate=BASE_LR)
    running = serve.start_server(engine, serve.ServerConfig(model_name="base", api_key=serve.API_KEY,
                                                            fine_tuning=fine_tuning))
    running.base, running.tokenizer, running.root = base, tokenizer, fine_tuning.root
    yield running
    running.stop()


@pytest.fixture(scope="module")
def finished_job(server, ft):
    """The end-to-end run: upload a file, create a job, poll it to the end (what every test here reads)."""
    client = server.openai()
    uploaded = client.files.create(file=("train.jsonl", ft.jsonl(ft.chat_examples())), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="base", training_file=uploaded.id, suffix="shout", seed=SEED,
                                         hyperparameters=HYPER, extra_body={"lora": LORA})
    assert job.status == "validating_files"
    return uploaded, wait_finished(client, job.id)


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
    model, losses = ft.peft_loop(server.base, server.tokenizer, records, seed=SEED, r=LORA["r"],
                                 alpha=LORA["alpha"], targets=LORA["target_modules"], n_epochs=HYPER["n_epochs"],
                                 batch_size=HYPER["batch_size"], lr=BASE_LR * HYPER["learning_rate_multiplier"])
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
