"""patch_model against transformers' own modules: same weights, same inputs, fp32."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import moeplug
from moeplug.tiny import TINY_CONFIGS, tiny_model

FAMILIES = list(TINY_CONFIGS)


def _batch(seed: int = 1, batch: int = 3, length: int = 9):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in one row: losses must ignore it
    return ids, mask


def _loss_and_grads(model, ids, mask):
    model.zero_grad()
    out = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_matches_transformers(family, device):
    # On a GPU (the `device` fixture, tests/conftest.py) the patched experts run the Triton grouped GEMM.
    reference, patched = tiny_model(family).to(device), tiny_model(family).to(device)
    report = moeplug.patch_model(patched)
    assert report.family == family and report.routers and report.experts
    ids, mask = (t.to(device) for t in _batch())
    ref_out, ref_grads = _loss_and_grads(reference, ids, mask)
    out, grads = _loss_and_grads(patched, ids, mask)
    # fp32 grouped GEMMs sum in a different order than transformers' per-expert loop.
    torch.testing.assert_close(out.logits, ref_out.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref_out.loss, atol=1e-5, rtol=0)
    # DeepSeek-V3 has no balancing loss in transformers (nor, before 5.2x, an aux_loss field)
    if getattr(ref_out, "aux_loss", None) is not None:
        torch.testing.assert_close(out.aux_loss, ref_out.aux_loss, atol=1e-6, rtol=0)
    assert set(grads) == set(ref_grads)
    routed = [n for n in grads if "experts" in n or "gate.weight" in n or "router" in n]
    assert routed, "no router/expert gradients were compared"
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_unpatch_restores_transformers(family):
    reference, model = tiny_model(family), tiny_model(family)
    before = model.config._experts_implementation
    moeplug.patch_model(model, balance="micro", capacity_factor=1.0)
    moeplug.unpatch_model(model)
    assert model.config._experts_implementation == before
    assert all(type(m).__name__.startswith("MoEPlug") is False for m in model.modules())
    ids, mask = _batch()
    torch.testing.assert_close(
        model(ids, attention_mask=mask, labels=ids, output_router_logits=True).loss,
        reference(ids, attention_mask=mask, labels=ids, output_router_logits=True).loss, atol=0, rtol=0)


def test_save_load_round_trip(tmp_path):
    model = tiny_model("qwen2_moe")
    moeplug.patch_model(model)
    ids, mask = _batch()
    expected = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(plain(ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=0)
    # What the round trip guarantees bit for bit: the weights (save + load copy bytes, no arithmetic).
    saved = model.state_dict()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    moeplug.patch_model(plain)
    # The logits run the same ops on the same bytes, but loaded weights may sit at other addresses and
    # strides, which changes the SIMD/GEMM summation order (1.5e-8 apart on an AMD EPYC, 0 here). A
    # reordered fp32 dot product of length H moves by at most ~H·eps·sum|terms|; over the layers that is
    # layers·H·eps times the logit scale (~1e-5 relative here), far below any real change of the model.
    eps, config = torch.finfo(torch.float32).eps, plain.config
    tol = config.num_hidden_layers * config.hidden_size * eps * expected.abs().max().item()
    torch.testing.assert_close(plain(ids, attention_mask=mask).logits, expected, atol=tol, rtol=0)


def test_micro_balance_replaces_pooled_loss():
    """balance="micro": loss = CE + coef * sum over layers of each layer's own LBL."""
    model = tiny_model("mixtral")
    coef = 0.05
    moeplug.patch_model(model, balance="micro", aux_loss_coef=coef)
    ids, mask = _batch()
    out = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    plain_ce = tiny_model("mixtral")(ids, attention_mask=mask, labels=ids).loss
    top_k = model.config.num_experts_per_tok
    # Oracle: transformers' own loss function applied to one layer at a time equals k * our LBL.
    per_layer = [load_balancing_loss_func((logits,), model.config.num_local_experts, top_k, mask).detach() / top_k
                 for logits in out.router_logits]
    expected_aux = coef * torch.stack(per_layer).sum()
    torch.testing.assert_close(out.aux_loss, expected_aux, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.loss, plain_ce + expected_aux, atol=1e-5, rtol=0)
    stats = moeplug.router_stats(model)
    assert len(stats) == model.config.num_hidden_layers
    for layer_stats, expected in zip(stats.values(), per_layer):
        assert layer_stats.lbl == pytest.approx(expected.item(), rel=1e-5)
        assert int(layer_stats.tokens_per_expert.sum()) == ids.numel() * top_k


def test_capacity_drops_what_the_policy_names():
    """Oracle: transformers' eager experts skip index E; drops are decided here by a plain loop."""
    capacity_factor = 0.5
    patched = tiny_model("mixtral")
    reference = tiny_model("mixtral")
    reference.set_experts_implementation("eager")
    num_experts = reference.config.num_local_experts

    def drop_by_probability(module, args, output):
        logits, weights, index = output
        probs = torch.softmax(logits.detach().float(), dim=-1)
        tokens, top_k = index.shape
        capacity = -(-int(capacity_factor * tokens * top_k) // num_experts)
        index, weights = index.clone(), weights.clone()
        for expert in range(num_experts):
            slots = [(float(probs[t, expert]), t, j) for t in range(tokens) for j in range(top_k) if index[t, j] == expert]
            for _, t, j in sorted(slots, key=lambda s: -s[0])[capacity:]:
                index[t, j], weights[t, j] = num_experts, 0.0
        return logits, weights, index

    for layer in reference.model.layers:
        layer.mlp.gate.register_forward_hook(drop_by_probability)
    moeplug.patch_model(patched, capacity_factor=capacity_factor, drop_policy="probs")
    ids, mask = _batch()
    expected = reference(ids, attention_mask=mask).logits
    actual = patched(ids, attention_mask=mask).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    dropped = sum(s.dropped for s in moeplug.router_stats(patched).values())
    assert dropped > 0


def test_patch_errors_are_clear():
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="not supported.*mixtral"):
        moeplug.patch_model(llama)
    model = tiny_model("mixtral")
    with pytest.raises(TypeError, match="unknown patch_model option.*capacity_factor"):
        moeplug.patch_model(model, capacity=2)
    with pytest.raises(ValueError, match="balance='globl'"):
        moeplug.patch_model(model, balance="globl")
    with pytest.raises(ValueError, match="capacity_factor=-1"):
        moeplug.patch_model(model, capacity_factor=-1)
    moeplug.patch_model(model)
    with pytest.raises(RuntimeError, match="already patched"):
        moeplug.patch_model(model)


def test_nan_router_input_raises():
    model = tiny_model("olmoe")
    moeplug.patch_model(model)
    embeds = torch.full((1, 4, model.config.hidden_size), float("nan"))
    with pytest.raises(FloatingPointError, match="NaN"):
        model(inputs_embeds=embeds)
