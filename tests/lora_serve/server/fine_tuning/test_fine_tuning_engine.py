"""The engine side without HTTP: checkpoint/resume across a restart, a failing job, the co-scheduling budget,
and the loss masks of both file formats."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from lora_serve import Engine, EngineConfig, SamplingParams
from lora_serve.engine import StepReport
from lora_serve.fine_tuning import FineTuner, FineTuningConfig, FineTuningService
from lora_serve.fine_tuning.cosched import CostModel, training_budget
from lora_serve.fine_tuning.data import tokenize


def _engine(lora, tokenizer, root, **options):
    engine = Engine(copy.deepcopy(lora.tiny_model("llama")), tokenizer, EngineConfig(pool_slots=4000))
    config = FineTuningConfig(root=root, **options)
    engine.attach_background(FineTuner(engine, config))
    return engine, FineTuningService(engine, config, "base")


def _create(service, ft, files_root=None, **hyper):
    file_id = service.files.add("t.jsonl", ft.jsonl(ft.chat_examples()), "fine-tune").id
    hyperparameters = {"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 10.0, **hyper}
    return service.create_job("base", file_id, None, None, 5, hyperparameters, dict(ft.LORA))["id"]


def _step_until(engine, service, job_id, done, limit=500):
    for _ in range(limit):
        engine.step()
        if done(service.jobs.state(job_id)):
            return service.jobs.state(job_id)
    raise AssertionError(f"job {job_id} still {service.jobs.state(job_id)}")


def test_a_restarted_engine_resumes_the_job_from_its_checkpoint(lora, serve, ft, tmp_path):
    tokenizer = serve.char_tokenizer()
    straight, straight_service = _engine(lora, tokenizer, tmp_path / "a", checkpoint_every=2)
    job_a = _create(straight_service, ft)
    _step_until(straight, straight_service, job_a, lambda s: s.status == "succeeded")

    first, service = _engine(lora, tokenizer, tmp_path / "b", checkpoint_every=2)
    job_b = _create(service, ft)
    _step_until(first, service, job_b, lambda s: s.step == 3)  # checkpoint at step 2, one step past it
    del first  # the "crash": step 3 is lost, the job stays running on disk
    second, service = _engine(lora, tokenizer, tmp_path / "b", checkpoint_every=2)
    state = _step_until(second, service, job_b, lambda s: s.status == "succeeded")
    assert any("Resumed from the checkpoint of step 2" in e["message"] for e in service.jobs.events(job_b))
    assert state.step == 6
    resumed = load_file(str(service.jobs.adapter_dir(job_b) / "adapter_model.safetensors"))
    expected = load_file(str(straight_service.jobs.adapter_dir(job_a) / "adapter_model.safetensors"))
    for key, value in expected.items():  # same process, same ops: only the checkpoint round trip differs
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)


def test_a_job_whose_loss_goes_non_finite_fails_and_serving_goes_on(lora, serve, ft, tmp_path):
    tokenizer = serve.char_tokenizer()
    # Adam moves every weight by ~lr on its first step: at lr 1e36 (x10) the next forward overflows fp32.
    engine, service = _engine(lora, tokenizer, tmp_path, base_learning_rate=1e36)
    before = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=6, temperature=0.0))[0].token_ids
    job_id = _create(service, ft, batch_size=1)
    state = _step_until(engine, service, job_id, lambda s: s.status == "failed")
    assert "training loss is" in state.error["message"] and state.error["code"] == "training_error"
    assert engine.background.current is None
    assert engine.generate([[5, 6, 7]], SamplingParams(max_tokens=6, temperature=0.0))[0].token_ids == before


def _report(tokens=0, seconds=0.0, running=0, waiting=0, budget=256):
    return StepReport(tokens, seconds, running, waiting, budget)


def _costs(*samples):
    model = CostModel()
    for tokens, seconds in samples:
        model.add(tokens, seconds)
    return model


def test_training_gets_what_inference_leaves_and_the_slo_allows(tmp_path):
    free = FineTuningConfig(root=tmp_path)
    slo = FineTuningConfig(root=tmp_path, slo_itl_s=0.05, slo_ttft_s=0.2)
    unmeasured, per_ms = CostModel(), _costs((40, 0.04))  # 1 ms per token, no fixed cost seen yet
    assert training_budget(_report(), 40, free, unmeasured) == 256  # idle: the whole step
    assert training_budget(_report(running=3, tokens=200), 40, free, unmeasured) == 56  # what inference left
    assert training_budget(_report(running=3, tokens=230), 40, free, unmeasured) is None  # not one example fits
    assert training_budget(_report(running=3, tokens=10, waiting=1), 40, free, unmeasured) is None  # queue first
    # Planned at 75% of the targets. ITL: 37.5 ms less a 20 ms inference step leaves 17 tokens (< 30: skip the
    # step); less a 5 ms one, 32
    assert training_budget(_report(running=3, tokens=10, seconds=0.02), 30, slo, per_ms) is None
    assert training_budget(_report(running=3, tokens=10, seconds=0.005), 30, slo, per_ms) == pytest.approx(32, abs=1)
    # idle: 150 ms of TTFT less the arrival's first step (the 37.5 ms ITL plan > a 20 ms inference step): 112
    # tokens; always at least one example
    assert training_budget(_report(), 40, slo, per_ms, inference_step_s=0.02) == pytest.approx(112, abs=1)
    assert training_budget(_report(), 300, slo, per_ms, inference_step_s=0.02) == 300
    ttft_only = FineTuningConfig(root=tmp_path, slo_ttft_s=0.2)
    assert training_budget(_report(), 40, ttft_only, per_ms, inference_step_s=0.02) == pytest.approx(130, abs=1)


def test_the_cost_model_separates_fixed_and_per_token_cost():
    model = _costs((30, 0.035), (60, 0.045), (120, 0.065))  # 25 ms + 1/3 ms per token
    assert model.tokens_within(0.055) == pytest.approx(90, abs=1)  # the per-token mean (0.69 ms) would say 79


def test_loss_masks_cover_assistant_turns_and_completions(serve):
    tokenizer = serve.char_tokenizer()
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "B"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "D"}]
    example = tokenize(tokenizer, {"messages": messages})
    assert example.input_ids == tokenizer.apply_chat_template(messages)["input_ids"]
    trained = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != -100])
    assert trained == "B<|im_end|>\nD<|im_end|>\n"  # each assistant turn with its end of turn, nothing else
    example = tokenize(tokenizer, {"prompt": "ab", "completion": "cd"})
    assert example.input_ids == tokenizer("ab")["input_ids"] + tokenizer("cd")["input_ids"] + [2]
    assert [t for t, label in zip(example.input_ids, example.labels) if label != -100] == example.input_ids[-3:]
