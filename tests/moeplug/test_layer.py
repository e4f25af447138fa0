"""MoELayer against a per-token Python reference and against transformers' own MoE blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from moeplug import MoEConfig, MoELayer, route

HIDDEN, WIDTH = 36, 20  # neither a multiple of 8


def _layer(num_experts=8, top_k=2, seed=0, **options) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(MoEConfig(num_experts=num_experts, top_k=top_k, hidden_size=HIDDEN,
                               intermediate_size=WIDTH, **options))
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5)
    return layer


def _per_token_reference(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """One token at a time, plain Python choice of experts, one matmul per expert."""
    cfg, rows = layer.config, []
    width = layer.experts.down_proj.shape[-1]
    for token in x:
        logits = layer.router.weight @ token
        scores = torch.softmax(logits, -1) if cfg.score_func == "softmax" else torch.sigmoid(logits)
        choice_scores = (scores + layer.selection_bias).tolist()
        chosen = sorted(range(cfg.num_experts), key=lambda e: -choice_scores[e])[: cfg.top_k]
        weights = torch.stack([scores[e] for e in chosen])
        if cfg.renormalize:
            weights = weights / weights.sum()
        out = torch.zeros_like(token)
        for weight, expert in zip(weights, chosen):
            gate_up = layer.experts.gate_up_proj[expert] @ token
            hidden = F.silu(gate_up[:width]) * gate_up[width:]
            out = out + weight * (layer.experts.down_proj[expert] @ hidden)
        rows.append(out)
    return torch.stack(rows)


def _grads(fn, layer, x):
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    out = fn(x)
    out.backward(torch.randn_like(out, generator=torch.Generator().manual_seed(5)))
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tokens", [1, 7, 100])
@pytest.mark.parametrize("top_k", [1, 2, 8])
def test_layer_matches_per_token_reference(tokens, top_k):
    layer = _layer(top_k=top_k)
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens))
    out, dx, grads = _grads(layer, layer, x)
    ref_out, ref_dx, ref_grads = _grads(lambda t: _per_token_reference(layer, t), layer, x)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)  # fp32, different summation order
    torch.testing.assert_close(dx, ref_dx, atol=1e-4, rtol=0)
    assert "router.weight" in grads and "experts.gate_up_proj" in grads
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=0, msg=name)


def test_expert_with_no_tokens():
    layer = _layer(top_k=2)
    layer.selection_bias[3] = -1e4  # expert 3 can never be chosen
    x = torch.randn(2, 5, HIDDEN)
    out = layer(x)
    assert out.shape == x.shape
    assert layer.stats.tokens_per_expert[3] == 0 and layer.stats.tokens_per_expert.sum() == 20
    torch.testing.assert_close(out.reshape(-1, HIDDEN), _per_token_reference(layer, x.reshape(-1, HIDDEN)),
                               atol=1e-5, rtol=0)
    out.sum().backward()
    assert layer.experts.gate_up_proj.grad[3].abs().max() == 0


def test_layer_matches_qwen2_moe_block():
    """Shared expert with sigmoid gate, softmax routing without renormalisation."""
    config = transformers.Qwen2MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=WIDTH, num_experts=6,
                                         num_experts_per_tok=2, shared_expert_intermediate_size=28,
                                         norm_topk_prob=False)
    torch.manual_seed(0)
    block = Qwen2MoeSparseMoeBlock(config)
    for param in block.parameters():
        torch.nn.init.normal_(param, 0, 0.3)
    layer = MoELayer(MoEConfig(num_experts=6, top_k=2, hidden_size=HIDDEN, intermediate_size=WIDTH,
                               shared_intermediate_size=28, shared_expert_gate=True, renormalize=False))
    state = {k.replace("gate.weight", "router.weight") if k.startswith("gate.") else k: v
             for k, v in block.state_dict().items()}
    layer.load_state_dict({**state, "selection_bias": torch.zeros(6)}, strict=True)
    x = torch.randn(3, 7, HIDDEN)
    torch.testing.assert_close(layer(x), block(x), atol=1e-5, rtol=0)


def test_sigmoid_group_limited_routing_matches_deepseek_v3():
    config = transformers.DeepseekV3Config(hidden_size=HIDDEN, n_routed_experts=16, num_experts_per_tok=4,
                                           n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    torch.manual_seed(0)
    router = DeepseekV3TopkRouter(config)
    torch.nn.init.normal_(router.weight, 0, 0.5)
    torch.nn.init.normal_(router.e_score_correction_bias, 0, 0.1)
    x = torch.randn(50, HIDDEN)
    logits, weights, index = router(x)
    cfg = MoEConfig(num_experts=16, top_k=4, hidden_size=HIDDEN, score_func="sigmoid", num_groups=4,
                    topk_groups=2, routed_scaling=2.5)
    ours = route(logits, cfg, selection_bias=router.e_score_correction_bias)
    # Both pick the same set of experts per token; order inside the top-k may differ.
    order, ref_order = ours.top_k_index.argsort(-1), index.argsort(-1)
    torch.testing.assert_close(ours.top_k_index.gather(1, order), index.gather(1, ref_order))
    torch.testing.assert_close(ours.top_k_weights.gather(1, order), weights.gather(1, ref_order), atol=1e-6, rtol=0)


def test_capacity_position_policy_keeps_earliest_tokens():
    cfg = MoEConfig(num_experts=2, top_k=1, hidden_size=4, capacity_factor=1.0, drop_policy="position")
    logits = torch.tensor([[5.0, 0.0]] * 3 + [[0.0, 5.0]])  # three tokens want expert 0, capacity is 2
    routing = route(logits, cfg)
    assert routing.top_k_index.flatten().tolist() == [0, 0, 2, 1]  # token 2 dropped (sentinel 2)
    assert routing.top_k_weights[2].item() == 0 and int(routing.dropped) == 1
    by_probability = route(torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [0.0, 1.0]]),
                           MoEConfig(num_experts=2, top_k=1, hidden_size=4, capacity_factor=1.0))
    assert by_probability.top_k_index.flatten().tolist() == [2, 0, 0, 1]  # lowest-probability token 0 dropped


def test_bad_input_errors():
    layer = _layer()
    with pytest.raises(ValueError, match="size 35.*hidden_size=36"):
        layer(torch.randn(4, 35))
    with pytest.raises(ValueError, match="top_k=9 exceeds num_experts=8"):
        MoEConfig(num_experts=8, top_k=9)
    with pytest.raises(ValueError, match="score_func='tanh'.*softmax"):
        MoEConfig(score_func="tanh")
    with pytest.raises(ValueError, match="num_groups=3 must divide num_experts=8"):
        MoEConfig(num_groups=3)
    with torch.no_grad():
        layer.router.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        layer(torch.randn(4, HIDDEN))
