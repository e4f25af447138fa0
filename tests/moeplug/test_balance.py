"""Balancing losses against transformers' `load_balancing_loss_func` and closed-form values."""

from __future__ import annotations

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moeplug import load_balancing_loss, router_z_loss, sequence_load_balancing_loss


def _route(logits: torch.Tensor, top_k: int):
    probs = torch.softmax(logits, -1)
    return probs, probs.topk(top_k, -1).indices


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_micro_lbl_equals_transformers_on_one_layer(top_k):
    logits = torch.randn(37, 6, generator=torch.Generator().manual_seed(top_k)) * 2
    probs, selected = _route(logits, top_k)
    ours = load_balancing_loss(probs, selected, top_k)
    theirs = load_balancing_loss_func((logits,), 6, top_k)  # = k x the normalised form
    torch.testing.assert_close(ours * top_k, theirs, atol=1e-6, rtol=1e-6)


def test_micro_lbl_with_padding_mask_equals_transformers():
    logits = torch.randn(4 * 9, 5, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, :4] = 0
    mask[3, :7] = 0
    probs, selected = _route(logits, 2)
    ours = load_balancing_loss(probs, selected, 2, token_mask=mask.reshape(-1))
    theirs = load_balancing_loss_func((logits,), 5, 2, attention_mask=mask)
    torch.testing.assert_close(ours * 2, theirs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_uniform_routing_gives_exactly_one(top_k):
    experts, tokens = 8, 64
    probs = torch.full((tokens, experts), 1 / experts)
    # Round-robin choices: every expert gets exactly tokens * k / E assignments.
    selected = (torch.arange(tokens).unsqueeze(1) * top_k + torch.arange(top_k)) % experts
    assert load_balancing_loss(probs, selected, top_k).item() == pytest.approx(1.0, abs=1e-6)
    assert sequence_load_balancing_loss(probs, selected, top_k, num_sequences=4).item() == pytest.approx(1.0, abs=1e-6)


def test_collapsed_routing_gives_num_experts():
    probs = torch.zeros(10, 4)
    probs[:, 0] = 1
    selected = torch.zeros(10, 1, dtype=torch.long)
    assert load_balancing_loss(probs, selected, 1).item() == pytest.approx(4.0)


def test_sequence_lbl_is_mean_of_per_sequence_micro_lbl():
    logits = torch.randn(3 * 11, 6, generator=torch.Generator().manual_seed(2))
    probs, selected = _route(logits, 2)
    per_sequence = [load_balancing_loss(p, s, 2) for p, s in zip(probs.split(11), selected.split(11))]
    torch.testing.assert_close(sequence_load_balancing_loss(probs, selected, 2, 3), torch.stack(per_sequence).mean())
    torch.testing.assert_close(sequence_load_balancing_loss(probs, selected, 2, 1), load_balancing_loss(probs, selected, 2))


def test_global_counts_seam():
    """Counts from a larger (global) batch replace local ones; gradients stay local."""
    logits = torch.randn(8, 4, requires_grad=True)
    probs, selected = _route(logits, 1)
    counts = torch.tensor([10.0, 2.0, 2.0, 2.0])  # 16 tokens counted globally
    loss = load_balancing_loss(probs, selected, 1, counts=counts, counted_tokens=16)
    expected = 4 / (1 * 16 * 8) * (probs.sum(0) * counts).sum()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_z_loss_closed_form():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (torch.log(torch.tensor(2.0)) ** 2 + torch.logsumexp(torch.tensor([1.0, 2.0]), 0) ** 2) / 2
    torch.testing.assert_close(router_z_loss(logits), expected)
    torch.testing.assert_close(router_z_loss(logits, token_mask=torch.tensor([0, 1])),
                               torch.logsumexp(torch.tensor([1.0, 2.0]), 0) ** 2)
