"""Global-batch balancing, aux-loss-free bias and the optimizer-step controller (one process)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import moeplug
from moeplug import BalanceController, MoEConfig, MoELayer
from moeplug.tiny import tiny_model

HIDDEN = 20


def _layer(balance: str, seed: int = 0, **options) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(MoEConfig(num_experts=6, top_k=2, hidden_size=HIDDEN, intermediate_size=12,
                               balance=balance, aux_loss_coef=1.0, **options))
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5)
    return layer.train()


def test_global_equals_micro_with_one_micro_batch_and_one_rank():
    x = torch.randn(3, 11, HIDDEN)
    micro, global_ = _layer("micro"), _layer("global")
    BalanceController(global_)
    micro(x), global_(x)
    assert torch.equal(global_.aux_loss, micro.aux_loss)


def test_global_uses_running_counts_of_the_step():
    layer = _layer("global")
    controller = BalanceController(layer)
    first, second = torch.randn(16, HIDDEN), torch.randn(16, HIDDEN)
    layer(first)
    layer(second)
    # Oracle from transformers' own pieces: softmax top-k counts over both micro-batches.
    logits = [layer.router(x).detach() for x in (first, second)]
    counts = sum(torch.bincount(torch.softmax(lg, -1).topk(2, -1).indices.flatten(), minlength=6) for lg in logits)
    probs = torch.softmax(logits[1], -1)
    expected = 6 / (2 * 32 * 16) * (probs.sum(0) * counts).sum()
    torch.testing.assert_close(layer.aux_loss.detach(), expected)
    controller.step()
    torch.testing.assert_close(controller.last_step_counts[""].float(), counts.float())
    layer(first)  # a new step starts from zero: micro-batch loss again
    torch.testing.assert_close(layer.aux_loss.detach(),
                               load_balancing_loss_func((logits[0],), 6, 2) / 2, atol=1e-6, rtol=1e-6)


def test_global_without_controller_is_a_clear_error():
    with pytest.raises(RuntimeError, match="BalanceController"):
        _layer("global")(torch.randn(4, HIDDEN))
    _layer("global").eval()(torch.randn(4, HIDDEN))  # evaluation needs no step boundary


def test_optimizer_hook_closes_one_step_per_optimizer_step():
    layer = _layer("micro")
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
    controller = BalanceController(layer, optimizer)
    for _ in range(4):  # gradient accumulation over 4 micro-batches of 5 tokens
        layer(torch.randn(5, HIDDEN)).sum().backward()
    assert controller.steps == 0
    optimizer.step()
    assert controller.steps == 1 and controller.last_step_counts[""].sum() == 4 * 5 * 2
    metrics = controller.metrics()
    assert metrics["moe/max_over_mean"] >= 1.0 and "moe/lbl" in metrics


def test_optimizer_stepped_once_per_param_group_closes_one_step():
    # DeepSpeed ZeRO-1/2 call the torch optimizer's step() once per param group in one real step.
    layer = _layer("micro")
    optimizer = torch.optim.SGD([{"params": [layer.router.weight]},
                                 {"params": [p for n, p in layer.named_parameters() if n != "router.weight"]}], lr=0.0)
    controller = BalanceController(layer, optimizer, bias_update_rate=0.01)
    for step in range(1, 4):
        layer(torch.randn(5, HIDDEN)).sum().backward()
        for _ in optimizer.param_groups:
            optimizer.step()  # as ZeRO's per-group step does, with the other groups swapped out
        assert controller.steps == step and controller.last_step_counts[""].sum() == 5 * 2
    # the bias moved once per real step: each coordinate by exactly rate x sign, three times at most
    assert float(layer.selection_bias.abs().max()) <= 3 * 0.01 + 1e-9


def test_aux_free_bias_moves_a_skewed_router_toward_balance():
    layer = _layer("none")
    with torch.no_grad():
        layer.router.weight[0] += 0.3  # inputs below are shifted so expert 0 is overloaded
    controller = BalanceController(layer, bias_update_rate=0.01)
    x = torch.randn(256, HIDDEN) + 0.5
    ratios = []
    for _ in range(80):
        with torch.no_grad():
            layer(x)
        ratios.append(controller.step()["moe/max_over_mean"])
    # The sign rule oscillates around balance with a constant step: compare the last 10 steps' mean.
    settled = sum(ratios[-10:]) / 10
    assert ratios[0] > 2.0 and settled < 0.7 * ratios[0], (ratios[0], settled)
    assert layer.selection_bias[0] < 0  # the overloaded expert was pushed down


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_aux_free_bias_on_patched_models(family):
    model = tiny_model(family).train()
    moeplug.patch_model(model, balance="none")
    controller = BalanceController(model, bias_update_rate=0.02)
    skewed = controller.state_dict()
    for bias in skewed["biases"].values():
        bias[0] = 1.0  # start with expert 0 chosen by every token
    controller.load_state_dict(skewed)
    ids = torch.randint(3, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    ratios = []
    for _ in range(60):
        with torch.no_grad():
            model(ids)
        ratios.append(controller.step()["moe/max_over_mean"])
    assert sum(ratios[-10:]) / 10 < 0.75 * ratios[0], ratios
    biases = controller.state_dict()["biases"]
    assert all(b.abs().sum() > 0 for b in biases.values())
    fresh = tiny_model(family)
    moeplug.patch_model(fresh, balance="none")
    restored = BalanceController(fresh, bias_update_rate=0.05)
    restored.load_state_dict(controller.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model.eval()(ids).logits)


def test_patched_global_balance_matches_micro_on_one_batch():
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    losses = {}
    for balance in ("micro", "global"):
        model = tiny_model("qwen3_moe").train()
        moeplug.patch_model(model, balance=balance)
        BalanceController(model)
        losses[balance] = model(ids, labels=ids).loss
    assert torch.equal(losses["micro"], losses["global"])


def test_checkpoint_recompute_is_not_counted_twice():
    from torch.utils.checkpoint import checkpoint

    plain, ckpt = _layer("global"), _layer("global")
    controllers = [BalanceController(plain), BalanceController(ckpt)]
    x = torch.randn(2, 9, HIDDEN)
    for micro_batch in (x, x + 1):
        (plain(micro_batch).sum() + plain.aux_loss).backward()
        out = checkpoint(ckpt, micro_batch, use_reentrant=False)
        (out.sum() + ckpt.aux_loss).backward()
    for controller in controllers:
        controller.step()
    torch.testing.assert_close(controllers[1].last_step_counts[""], controllers[0].last_step_counts[""])
    assert controllers[0].last_step_counts[""].sum() == 2 * 18 * 2
    torch.testing.assert_close(ckpt.router.weight.grad, plain.router.weight.grad)
