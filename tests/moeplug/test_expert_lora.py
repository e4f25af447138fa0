"""PEFT LoRA on the experts of a patched model: PEFT's own numbers, without PEFT's per-expert ΔW.

Oracle: the same PEFT adapter on the unpatched transformers model (PEFT folds W + scaling * B A for
every expert at every forward). Our path runs x W_e + scaling * (x A_e^T) B_e^T as grouped GEMMs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import layer as peft_lora_layer

import moeplug
from moeplug.hf import SUPPORTED_FAMILIES
from moeplug.integrations.peft import is_grouped
from moeplug.tiny import tiny_model

EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _router_weight(family: str) -> str:
    return "mlp.router.weight" if family == "gpt_oss" else "mlp.gate.weight"


def _config(family: str, train_router: bool = False) -> LoraConfig:
    # init_lora_weights=False: B is random too, so a wrong expert path cannot hide behind B = 0.
    targets = EXPERT_PARAMS + ([_router_weight(family)] if train_router else [])
    return LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], target_parameters=targets,
                      init_lora_weights=False)


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(seed))


class _CountFolds:
    """Counts PEFT's per-expert folds W + scaling * B A (what the grouped path must never do)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        fold = peft_lora_layer._LoraFactorsProxy.forward

        def counted(proxy, weight):
            self.calls += 1
            return fold(proxy, weight)

        monkeypatch.setattr(peft_lora_layer._LoraFactorsProxy, "forward", counted)


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if "lora_" in name and p.grad is not None}


def _pair(family: str, train_router: bool = False, dtype=torch.float32):
    """(PEFT on the unpatched model, PEFT on the patched model) with the same weights."""
    base = tiny_model(family).to(dtype)
    base.set_experts_implementation("eager")  # transformers' grouped_mm path needs 16-byte strides on CPU
    reference = get_peft_model(copy.deepcopy(base), _config(family, train_router))
    moeplug.patch_model(base)
    ours = get_peft_model(base, _config(family, train_router))
    ours.load_state_dict(reference.state_dict())
    return reference, ours


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_expert_lora_matches_peft_without_folding(family, monkeypatch):
    reference, ours = _pair(family)
    folds = _CountFolds(monkeypatch)
    ids = _batch()
    expected = reference(ids, labels=ids)
    expected.loss.backward()
    assert folds.calls > 0, "the oracle did not go through PEFT's fold: the test would prove nothing"
    folds.calls = 0
    out = ours(ids, labels=ids)
    out.loss.backward()
    assert folds.calls == 0, "the patched model folded W + BA per expert"
    assert sum(is_grouped(m) for m in ours.modules()) == 2 * len(moeplug.moe_modules(ours))
    # fp32, same products regrouped: rounding at 1e-6 relative, amplified through a few layers.
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=0)
    grads, expected_grads = _lora_grads(ours), _lora_grads(reference)
    assert grads.keys() == expected_grads.keys() and any("experts" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-4, rtol=0, msg=name)


def test_expert_lora_bf16_matches_peft():
    reference, ours = _pair("mixtral", dtype=torch.bfloat16)
    ids = _batch(1)
    expected, out = reference(ids).logits.float(), ours(ids).logits.float()
    # bf16 keeps 8 bits: two roundings of O(1) logits differ by a few 2^-8 steps.
    torch.testing.assert_close(out, expected, atol=6e-2, rtol=0)


def test_router_lora_trains_under_global_balance():
    reference, ours = _pair("qwen3_moe", train_router=True)
    controller = moeplug.BalanceController(ours, bias_update_rate=1e-3)
    ours.train()
    ids = _batch(2)
    out = ours(ids, labels=ids)
    # The routing bias starts at zero: this forward is PEFT's, LoRA on the router weight included.
    torch.testing.assert_close(out.logits, reference(ids).logits, atol=1e-5, rtol=0)
    out.loss.backward()
    router_grads = [p.grad for name, p in ours.named_parameters() if "gate" in name and "lora_" in name]
    assert router_grads and all(g is not None and g.abs().sum() > 0 for g in router_grads)
    assert controller.step()["moe/max_over_mean"] >= 1.0
    assert all(layer.state.selection_bias.abs().sum() > 0 for layer in moeplug.moe_modules(ours))


def test_router_copy_is_a_clear_error():
    base = tiny_model("mixtral")
    moeplug.patch_model(base)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["o_proj"], modules_to_save=["gate"]))
    with pytest.raises(RuntimeError, match="modules_to_save.*target_parameters"):
        model(_batch())


def test_saved_adapter_loads_on_unpatched_model(tmp_path):
    reference, ours = _pair("olmoe")
    ours.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("olmoe"), tmp_path)
    ids = _batch(3)
    torch.testing.assert_close(loaded(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


def test_peft_before_patch_is_adopted(monkeypatch):
    base = tiny_model("mixtral")
    reference = get_peft_model(copy.deepcopy(base), _config("mixtral"))
    ours = get_peft_model(base, _config("mixtral"))
    ours.load_state_dict(reference.state_dict())
    moeplug.patch_model(ours.base_model.model)
    ids = _batch(4)
    expected = reference(ids).logits
    folds = _CountFolds(monkeypatch)
    torch.testing.assert_close(ours(ids).logits, expected, atol=1e-5, rtol=0)
    assert folds.calls == 0, "the wrappers PEFT made before patching still fold W + BA"


def test_a_second_adapter_on_grouped_wrappers_matches_peft(monkeypatch):
    reference, ours = _pair("qwen2_moe")
    ids = _batch(5)
    ours(ids)  # wrappers adopted
    for model in (reference, ours):
        torch.manual_seed(7)
        model.add_adapter("second", _config("qwen2_moe"))
    ours.load_state_dict(reference.state_dict())
    for model in (reference, ours):
        model.set_adapter("second")
    expected = reference(ids).logits
    folds = _CountFolds(monkeypatch)
    torch.testing.assert_close(ours(ids).logits, expected, atol=1e-5, rtol=0)
    assert folds.calls == 0
