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


def _write_config(tmp_path, good, name, config_bytes: bytes):
    bad = tmp_path / name
    bad.mkdir()
    (bad / "adapter_config.json").write_bytes(config_bytes)
    (bad / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    return bad


def _config_with(good, **changes) -> bytes:
    return json.dumps({**json.loads((good / "adapter_config.json").read_text()), **changes}).encode()


BAD_CONFIGS = {  # issue 16: each of these answered 500 with a traceback instead of naming the problem
    "not_utf8": (lambda good: b"\xff\xfe{", "adapter_config.json is not UTF-8 text"),
    "json_list": (lambda good: b"[1, 2]", "must hold a JSON object, got a list"),
    "bad_regex": (lambda good: _config_with(good, rank_pattern={"q_proj(": 2}), "rank_pattern key 'q_proj\\(' is not a valid regex"),
    "pattern_list": (lambda good: _config_with(good, alpha_pattern=["x"]), "alpha_pattern must be an object"),
    "alpha_string": (lambda good: _config_with(good, lora_alpha="8"), "lora_alpha must be a positive number, got '8'"),
    "rank_pattern_zero": (lambda good: _config_with(good, rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be"),
    "rank_bool": (lambda good: _config_with(good, r=True), "r must be a positive number, got True"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_configs_are_adapter_errors_that_name_no_server_path(setup, case):
    engine, _, good, tmp_path = setup
    make, message = BAD_CONFIGS[case]
    bad = _write_config(tmp_path, good, case, make(good))
    with pytest.raises(AdapterError, match=message) as caught:
        engine.add_adapter("bad", bad)
    assert str(tmp_path) not in str(caught.value) and str(caught.value).startswith("adapter 'bad': ")
    assert [i.name for i in engine.list_adapters()] == ["good"]


@pytest.mark.parametrize("path", ["with\0nul", "x" * 5000, "a/" * 3000])
def test_unusable_paths_are_adapter_errors(setup, path):
    engine, _, _, tmp_path = setup
    with pytest.raises(AdapterError, match="adapter 'p': (no adapter_config.json|cannot read adapter_config.json)"):
        engine.add_adapter("p", tmp_path / path)


def test_names_are_bounded(setup):
    engine, _, good, _ = setup
    with pytest.raises(AdapterError, match="1 to 256 characters"):
        engine.add_adapter("n" * 257, good)
    assert engine.add_adapter("n" * 256, good).name == "n" * 256


def test_identical_adapters_are_stored_once_and_host_memory_is_capped(tmp_path, lora):
    base = lora.tiny_model("llama")
    lora.save_adapter(base, tmp_path / "a", 8, ["q_proj", "v_proj"], seed=0)
    lora.save_adapter(base, tmp_path / "b", 8, ["q_proj", "v_proj"], seed=1)
    # q_proj 64->64 and v_proj 64->32 at r=8, A and B in fp32 per layer, 2 layers.
    one = 2 * 4 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8)
    engine = Engine(copy.deepcopy(base), config=EngineConfig(pool_slots=4000, adapter_host_mb=1.5 * one / 2**20))
    for i in range(20):  # the same files under many names
        engine.add_adapter(f"a{i}", tmp_path / "a")
    assert engine.stats().adapter_host_bytes == one
    with pytest.raises(AdapterError, match=r"needs 0.01 MiB of host memory; 0.01 of the 0.02 MiB"):
        engine.add_adapter("b", tmp_path / "b")  # a second distinct copy would exceed 1.5 copies
    # A shared copy still serves every name like PEFT; removing names keeps it until the last one goes.
    expected = lora.peft_generate(base, tmp_path / "a", PROMPT, 6)
    assert engine.generate([PROMPT, PROMPT], GREEDY, ["a3", "a17"])[0].token_ids == expected
    for i in range(19):
        engine.remove_adapter(f"a{i}")
    assert engine.stats().adapter_host_bytes == one
    engine.remove_adapter("a19")
    assert engine.stats().adapter_host_bytes == 0
    engine.add_adapter("b", tmp_path / "b")
    assert engine.generate([PROMPT], GREEDY, "b")[0].token_ids == lora.peft_generate(base, tmp_path / "b", PROMPT, 6)
