"""Adapter registration: validation against the base model, clear errors, add/remove/list at run time."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_serve import AdapterError, AdapterInUseError, Engine, EngineConfig, FinishReason, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0)
PROMPT = [5, 17, 33, 9, 41, 77]


@pytest.fixture
def setup(tmp_path, lora):
    base = lora.tiny_model("llama")
    good = tmp_path / "good"
    lora.save_adapter(base, good, 4, ["q_proj", "up_proj"], seed=0)
    engine = Engine(copy.deepcopy(base), config=EngineConfig(pool_slots=4000))
    engine.add_adapter("good", good)
    return engine, base, good, tmp_path


def _copy_adapter(src, dst, edit_config=None, edit_tensors=None):
    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    tensors = load_file(str(src / "adapter_model.safetensors"))
    if edit_config:
        edit_config(config)
    if edit_tensors:
        edit_tensors(tensors)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


def _first_a(tensors):
    return next(k for k in tensors if k.endswith("lora_A.weight"))


BAD = {
    "wrong_shape": (None, lambda t: t.__setitem__(_first_a(t), torch.zeros(4, 48)), r"needs \(4, 64\)"),
    "wrong_rank": (lambda c: c.__setitem__("r", 8), None, r"with r=8 needs \(8, 64\)"),
    "unknown_module": (
        None,
        lambda t: t.__setitem__("base_model.model.model.layers.0.mlp.act.lora_A.weight", torch.zeros(4, 64)),
        "not a linear layer of the base model",
    ),
    "missing_b": (None, lambda t: t.pop(_first_a(t).replace("lora_A", "lora_B")), "but not both"),
    "dora": (lambda c: c.__setitem__("use_dora", True), None, "DoRA is not supported"),
    "not_lora": (lambda c: c.__setitem__("peft_type", "IA3"), None, "expected 'LORA'"),
    "nan": (None, lambda t: t[_first_a(t)].fill_(float("nan")), "non-finite"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapter_is_rejected_without_disturbing_loaded_ones(setup, case, lora):
    engine, base, good, tmp_path = setup
    before = engine.generate([PROMPT], GREEDY, "good")[0].token_ids
    edit_config, edit_tensors, message = BAD[case]
    bad = _copy_adapter(good, tmp_path / case, edit_config, edit_tensors)
    with pytest.raises(AdapterError, match=message):
        engine.add_adapter("bad", bad)
    assert [i.name for i in engine.list_adapters()] == ["good"]
    assert engine.generate([PROMPT], GREEDY, "good")[0].token_ids == before == lora.peft_generate(base, good, PROMPT, 6)


def test_missing_files_and_duplicate_names(setup):
    engine, _, good, tmp_path = setup
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        engine.add_adapter("x", tmp_path)
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "cfg_only" / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        engine.add_adapter("x", tmp_path / "cfg_only")
    with pytest.raises(AdapterError, match="already registered"):
        engine.add_adapter("good", good)
    with pytest.raises(KeyError, match="unknown adapter 'nope'"):
        engine.submit(PROMPT, GREEDY, "nope")


def test_add_list_remove_at_run_time(setup, lora):
    engine, base, good, tmp_path = setup
    other = tmp_path / "other"
    lora.save_adapter(base, other, 16, ["k_proj", "o_proj", "down_proj"], seed=5)
    running = engine.submit(PROMPT, SamplingParams(max_tokens=20, temperature=0), "good")
    engine.step()
    info = engine.add_adapter("other", other)  # while a request runs
    assert (info.max_rank, info.num_modules, info.resident) == (16, 6, False)
    assert engine.generate([PROMPT], GREEDY, "other")[0].token_ids == lora.peft_generate(base, other, PROMPT, 6)
    assert [i.name for i in engine.list_adapters()] == ["good", "other"]

    with pytest.raises(AdapterInUseError, match="used by 1 request"):
        engine.remove_adapter("good")
    engine.remove_adapter("good", abort_requests=True)
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outputs if o.finished] == [(running, FinishReason.ABORT)]
    engine.remove_adapter("other")
    assert engine.list_adapters() == []
    assert engine.pool_stats().free == engine.pool_stats().total
