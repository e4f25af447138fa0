"""2 gloo ranks x 2 micro-batches == 1 process on the concatenated micro-batches (loss and router grads)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from moeplug import BalanceController, MoEConfig, MoELayer

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]
RANKS, MICRO_BATCHES, TOKENS, HIDDEN = 2, 2, 12, 16


def _layer() -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=6, top_k=2, hidden_size=HIDDEN, intermediate_size=10,
                               balance="global", aux_loss_coef=0.5, z_loss_coef=0.01))
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5)
    return layer.train()


def _data() -> torch.Tensor:
    """[micro-batch, rank, tokens, hidden]: rank r's micro-batch m is data[m, r]."""
    return torch.randn(MICRO_BATCHES, RANKS, TOKENS, HIDDEN, generator=torch.Generator().manual_seed(1))


def _train_step(layer: MoELayer, micro_batches) -> list[float]:
    """One optimizer step of gradient accumulation; returns each micro-batch's aux loss."""
    BalanceController(layer)
    aux = []
    for x in micro_batches:
        out = layer(x)
        loss = out.pow(2).mean() + layer.aux_loss
        (loss / len(micro_batches)).backward()
        aux.append(layer.aux_loss.item())
    return aux


def _worker(rank: int, port: int, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    try:
        layer = _layer()
        aux = _train_step(layer, [mb[rank] for mb in _data()])
        # Data parallelism averages gradients over ranks (as DDP / DeepSpeed do).
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        for grad in grads.values():
            dist.all_reduce(grad)
            grad /= RANKS
        aux_t = torch.tensor(aux)
        dist.all_reduce(aux_t)
        if rank == 0:
            torch.save({"aux": (aux_t / RANKS).tolist(), "grads": grads}, result_path)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_on_concatenated_batches(tmp_path, spawn):
    result_path = str(tmp_path / "rank0.pt")
    spawn(_worker, RANKS, result_path)
    distributed = torch.load(result_path)

    single = _layer()
    aux = _train_step(single, [mb.reshape(RANKS * TOKENS, HIDDEN) for mb in _data()])
    # fp32 sums in a different order across processes
    assert distributed["aux"] == pytest.approx(aux, rel=1e-5)
    for name, param in single.named_parameters():
        torch.testing.assert_close(distributed["grads"][name], param.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert distributed["grads"]["router.weight"].abs().sum() > 0
