"""Shared pieces of the fine-tuning tests: a tiny chat dataset, the PEFT oracle loop and a served engine.

The oracle loop is written from PEFT and transformers only (``get_peft_model``, the model's own
``labels=`` loss, masks from the tokenizer's chat template), with the data order and LoRA init that
``lora_serve.fine_tuning.trainer`` / ``lora_params`` document.
"""

from __future__ import annotations

import copy
import json
import math
import time
import types

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lora_serve import Engine, EngineConfig
from lora_serve.fine_tuning import FineTuningConfig
from moeplug.fp8 import FP8AdamW

BASE_LR = 1e-3
HYPER = {"n_epochs": 3, "batch_size": 2, "learning_rate_multiplier": 10.0}
LORA = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}
SEED = 3
WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]


def chat_examples(count: int = 6) -> list[dict]:
    """Chat examples: the assistant repeats the user's word in upper case (one assistant turn each)."""
    return [{"messages": [{"role": "system", "content": "shout"},
                          {"role": "user", "content": WORDS[i % len(WORDS)]},
                          {"role": "assistant", "content": WORDS[i % len(WORDS)].upper()}]} for i in range(count)]


VALID = [{"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": w.upper()}]}
         for w in ("fox", "owl", "bee")]


def jsonl(records: list[dict]) -> bytes:
    """Records as JSONL bytes."""
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def oracle_tokens(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    """Ids and labels of a one-assistant-turn chat: the loss on what the template adds after the generation
    prompt (the assistant's content and end of turn)."""
    prompt = tokenizer.apply_chat_template(record["messages"][:-1], add_generation_prompt=True)["input_ids"]
    full = tokenizer.apply_chat_template(record["messages"])["input_ids"]
    assert full[: len(prompt)] == prompt
    return full, [-100] * len(prompt) + full[len(prompt):]


def peft_loop(base, tokenizer, records, *, seed, r, alpha, targets, n_epochs, batch_size, lr):
    """The offline oracle: PEFT LoRA, FP8AdamW (no weight decay), the documented order and init; returns the
    PEFT model and each step's loss (transformers' own token-mean loss of the padded batch)."""
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                           lora_dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    names = sorted(n for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A"))
    modules = dict(model.base_model.model.named_modules())
    with torch.no_grad():
        for name in names:
            layer = modules[name]
            bound = 1 / math.sqrt(layer.in_features)
            layer.lora_A["default"].weight.uniform_(-bound, bound, generator=generator)
            torch.nn.init.zeros_(layer.lora_B["default"].weight)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = FP8AdamW(params, lr=lr, weight_decay=0.0)
    tokens = [oracle_tokens(tokenizer, rec) for rec in records]
    losses = []
    model.train()
    for epoch in range(n_epochs):
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for start in range(0, len(order), batch_size):
            chosen = [tokens[i] for i in order[start : start + batch_size]]
            width = max(len(ids) for ids, _ in chosen)
            ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in chosen])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chosen])
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chosen])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    return model.eval(), losses


def wait_finished(client, job_id: str, timeout: float = 120):
    """Poll the job as a client would until it has finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish within {timeout} s: {job}")


@pytest.fixture(scope="session")
def ft():
    """Helpers and the job settings the tests share (``ft.chat_examples``, ``ft.peft_loop``, ``ft.HYPER``...)."""
    return types.SimpleNamespace(chat_examples=chat_examples, jsonl=jsonl, peft_loop=peft_loop,
                                 oracle_tokens=oracle_tokens, wait_finished=wait_finished, VALID=VALID, BASE_LR=BASE_LR,
                                 HYPER=HYPER, LORA=LORA, SEED=SEED)


@pytest.fixture(scope="session")
def server(lora, serve, tmp_path_factory):
    """A served tiny Llama with fine-tuning enabled (one engine for all fine-tuning tests)."""
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


@pytest.fixture(scope="session")
def finished_job(server):
    """The end-to-end run: upload a file, create a job, poll it to the end (what every test here reads)."""
    client = server.openai()
    uploaded = client.files.create(file=("train.jsonl", jsonl(chat_examples())), purpose="fine-tune")
    valid = client.files.create(file=("valid.jsonl", jsonl(VALID)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="base", training_file=uploaded.id, validation_file=valid.id,
                                         suffix="shout", seed=SEED, hyperparameters=HYPER, extra_body={"lora": LORA})
    assert job.status == "validating_files"
    return uploaded, wait_finished(client, job.id)

