"""patch_model beyond fp32 eager: low precision, torch.compile / torch.export, meta-device builds, static
caches, torch.save and deepcopy. The oracle is transformers' own model (eager experts) on the same weights."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import transformers

import moeplug
from moeplug.tiny import TINY_CONFIGS, tiny_config, tiny_model

FAMILIES = list(TINY_CONFIGS)


def _batch(batch: int = 2, length: int = 7):
    ids = torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding in one row
    return ids, mask


def _eager(model):
    model.set_experts_implementation("eager")  # transformers' reference loop (its grouped_mm needs 16-byte strides)
    return model


def _forward_backward(model, ids, mask, run=None):
    """Loss forward + backward of `model` (through `run`, e.g. its compiled form); output and gradients."""
    model.zero_grad()
    out = (model if run is None else run)(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    return out, {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_low_precision_is_as_close_to_fp32_as_transformers(family, dtype):
    ids, mask = _batch()
    exact, exact_grads = _forward_backward(_eager(tiny_model(family)), ids, mask)
    ref, ref_grads = _forward_backward(_eager(tiny_model(family).to(dtype)), ids, mask)
    patched_model = tiny_model(family).to(dtype)
    moeplug.patch_model(patched_model)
    out, grads = _forward_backward(patched_model, ids, mask)
    assert out.logits.dtype == dtype
    # Rounding to `dtype` moves transformers' own result away from fp32 by some amount; the patched model
    # may sum in another order, so it may be that far again, plus one ulp of the value's scale.
    ulp = torch.finfo(dtype).eps

    def assert_as_close(ours, theirs, oracle, name):
        drift = (theirs.float() - oracle).abs().max()
        error = (ours.float() - oracle).abs().max()
        assert error <= 2 * drift + ulp * oracle.abs().max(), f"{name}: {error:.3g} vs transformers' {drift:.3g}"

    assert_as_close(out.logits, ref.logits, exact.logits, "logits")
    assert_as_close(out.loss, ref.loss, exact.loss, "loss")
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        assert_as_close(grad, ref_grads[name], exact_grads[name], name)


def _compiled_matches_eager(family, backend):
    model = tiny_model(family)
    moeplug.patch_model(model, balance="micro", z_loss_coef=1e-3)
    model.train()
    ids, mask = _batch()
    expected, expected_grads = _forward_backward(model, ids, mask)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out, grads = _forward_backward(model, ids, mask, run=compiled)
    # Same ops in another order (fused by the compiler): fp32 rounding only.
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.aux_loss, expected.aux_loss, atol=1e-6, rtol=0)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-4, rtol=0, msg=name)
    assert moeplug.router_stats(model), "the compiled forward did not record routing statistics"


# One family in `make test-fast` (each compile takes 10-20 s here); CI runs all six.
FAST_ONE_FAMILY = [f if f == "mixtral" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]


@pytest.mark.parametrize("family", FAST_ONE_FAMILY)
def test_compiles_with_fullgraph(family):
    # aot_eager: Dynamo's full-graph capture and AOTAutograd's trace of forward and backward (where
    # data-dependent Python breaks), without the minutes of C++ code generation inductor costs here.
    _compiled_matches_eager(family, "aot_eager")


@pytest.mark.slow
def test_compiles_with_inductor():
    _compiled_matches_eager("mixtral", "inductor")


@pytest.mark.slow
def test_compiles_with_capacity_dropping():
    model = tiny_model("qwen2_moe")
    moeplug.patch_model(model, capacity_factor=1.0)
    ids, mask = _batch()
    expected = model(ids, attention_mask=mask).logits
    assert sum(s.dropped for s in moeplug.router_stats(model).values()) > 0, "no assignment was dropped"
    # Compiled, dropped slots run through an expert with gate 0 instead of being skipped.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAST_ONE_FAMILY)
def test_exports(family):
    model = tiny_model(family)
    moeplug.patch_model(model)
    ids, _ = _batch()
    seq = torch.export.Dim("seq", min=2, max=32)
    exported = torch.export.export(model, (ids,), kwargs={"use_cache": False},
                                   dynamic_shapes={"input_ids": {1: seq}, "use_cache": None}, strict=False)
    for length in (7, 11):  # the traced length and another one (dynamic sequence dimension)
        other = torch.randint(3, 96, (2, length), generator=torch.Generator().manual_seed(length))
        torch.testing.assert_close(exported.module()(other, use_cache=False).logits,
                                   model(other, use_cache=False).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_meta_device_build_then_load(family):
    source = tiny_model(family)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(tiny_config(family))
    moeplug.patch_model(model)
    model.to_empty(device="cpu")
    model.init_weights()  # what from_pretrained runs for buffers that no checkpoint holds
    model.load_state_dict(source.state_dict())
    for name, buffer in model.named_buffers():
        if name.endswith("moeplug_selection_bias"):
            assert torch.equal(buffer, torch.zeros_like(buffer)), name
    ids, mask = _batch()
    moeplug.patch_model(source)
    torch.testing.assert_close(model.eval()(ids, attention_mask=mask).logits,
                               source(ids, attention_mask=mask).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_generate_matches_dynamic(family):
    model = tiny_model(family)
    moeplug.patch_model(model)
    ids, mask = _batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    dynamic = model.generate(ids, **kwargs)
    reference = _eager(tiny_model(family)).generate(ids, **kwargs)
    assert torch.equal(static, dynamic) and torch.equal(dynamic, reference)


OPTIONS = dict(balance="micro", z_loss_coef=1e-3, capacity_factor=1.5, drop_policy="position")


@pytest.mark.parametrize("round_trip", ["torch.save", "deepcopy"])
def test_copies_keep_options_and_losses(round_trip):
    model = tiny_model("mixtral")
    moeplug.patch_model(model, **OPTIONS)
    if round_trip == "deepcopy":
        clone = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    ids, mask = _batch()
    expected = model(ids, attention_mask=mask, labels=ids)
    out = clone(ids, attention_mask=mask, labels=ids)
    assert out.aux_loss is not None
    # Same weights and inputs: only fp32 rounding could separate them; a lost option moves a loss by > 1e-3.
    torch.testing.assert_close(out.aux_loss, expected.aux_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-6, rtol=0)
    assert [m.state.config for m in moeplug.moe_modules(clone)] == [m.state.config for m in moeplug.moe_modules(model)]
    stats, expected_stats = moeplug.router_stats(clone), moeplug.router_stats(model)
    assert [s.dropped for s in stats.values()] == [s.dropped for s in expected_stats.values()]
    # The copy is independent: its hooks read its own routers, and unpatching it leaves the original patched.
    with torch.no_grad():
        clone.model.layers[0].mlp.gate.weight.mul_(-1)
    assert not torch.equal(clone(ids, attention_mask=mask, labels=ids).aux_loss, expected.aux_loss)
    torch.testing.assert_close(model(ids, attention_mask=mask, labels=ids).aux_loss, expected.aux_loss,
                               atol=1e-6, rtol=0)
    moeplug.unpatch_model(clone)
    assert moeplug.moe_modules(model) and model(ids, attention_mask=mask, labels=ids).aux_loss is not None
