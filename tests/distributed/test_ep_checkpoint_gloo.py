"""EP checkpoints: EP=2 save -> EP=1 load and export -> plain transformers, same logits; optimizer resume; atomic writes."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import transformers

import moeplug
from moeplug.checkpoint import export_pretrained, load_checkpoint, save_checkpoint
from moeplug.dispatch import allreduce_gradients
from moeplug.fp8 import FP8AdamW
from moeplug.tiny import tiny_model

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]
IDS = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(3))


def _trained_weights(model) -> None:
    """A deterministic change of every expert row, the same whether sharded or not."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".experts." in name:
                param.mul_(1.5).add_(0.01)


def _worker(rank: int, port: int, world: int, directory: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny_model("qwen2_moe")
        moeplug.patch_model(model, ep_size=world)
        _trained_weights(model)
        save_checkpoint(model, f"{directory}/ckpt")
        export_pretrained(model, f"{directory}/hf")
        torch.save(model(IDS).logits.detach(), f"{directory}/logits.{rank}")
    finally:
        dist.destroy_process_group()


def test_ep2_checkpoint_loads_at_ep1_and_exports_to_transformers(tmp_path, spawn):
    spawn(_worker, 2, 2, str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "experts-00000-of-00002.safetensors", "experts-00001-of-00002.safetensors", "moeplug.json",
        "replicated.safetensors"]
    reference = tiny_model("qwen2_moe")
    _trained_weights(reference)
    expected = reference(IDS).logits.detach()
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"logits.{rank}"), expected, atol=1e-5, rtol=0)

    single = tiny_model("qwen2_moe", seed=99)  # different init: everything must come from the checkpoint
    moeplug.patch_model(single)
    load_checkpoint(single, tmp_path / "ckpt")
    torch.testing.assert_close(single(IDS).logits, expected, atol=1e-5, rtol=0)

    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    torch.testing.assert_close(plain(IDS).logits, expected, atol=1e-5, rtol=0)


def _train(model, optimizer, rank: int, steps: range) -> list[float]:
    losses = []
    for step in steps:
        ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(10 * step + rank))
        loss = model(ids, labels=ids).loss
        loss.backward()
        allreduce_gradients(model)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _resume_worker(rank: int, port: int, world: int, directory: str) -> None:
    """Train 2 steps, save with the optimizer, train 2 more; then a fresh model and optimizer load and
    train the same 2 steps: every loss must be identical."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for run, seed in (("uninterrupted", 0), ("resumed", 99)):
            model = tiny_model("qwen2_moe", seed=seed).train()
            moeplug.patch_model(model, ep_size=world)
            optimizer = FP8AdamW(model.parameters(), lr=1e-2)
            if run == "uninterrupted":
                _train(model, optimizer, rank, range(2))
                save_checkpoint(model, f"{directory}/ckpt", optimizer)
            else:
                load_checkpoint(model, f"{directory}/ckpt", optimizer)
            results[run] = _train(model, optimizer, rank, range(2, 4))
        torch.save(results, f"{directory}/losses.{rank}")
    finally:
        dist.destroy_process_group()


def test_optimizer_state_resumes_training_exactly(tmp_path, spawn):
    spawn(_resume_worker, 2, 2, str(tmp_path))
    assert {p.name for p in (tmp_path / "ckpt").glob("optimizer-*")} == {
        "optimizer-00000-of-00002.pt", "optimizer-00001-of-00002.pt"}
    for rank in range(2):
        losses = torch.load(tmp_path / f"losses.{rank}")
        assert losses["resumed"] == losses["uninterrupted"], (rank, losses)
    # Optimizer state holds expert shards of ep_size 2: a model at ep_size 1 is refused, and left untouched.
    single = tiny_model("qwen2_moe", seed=7)
    moeplug.patch_model(single)
    before = {k: v.clone() for k, v in single.state_dict().items()}
    with pytest.raises(ValueError, match="optimizer state for ep_size=2, this model has ep_size=1"):
        load_checkpoint(single, tmp_path / "ckpt", FP8AdamW(single.parameters()))
    assert all(torch.equal(v, single.state_dict()[k]) for k, v in before.items())
    load_checkpoint(single, tmp_path / "ckpt")  # the weights alone load at any ep_size
    save_checkpoint(single, tmp_path / "weights")
    with pytest.raises(ValueError, match="holds no optimizer state"):  # a weights-only checkpoint
        load_checkpoint(single, tmp_path / "weights", FP8AdamW(single.parameters()))
    with pytest.raises(TypeError, match="ZeRO optimizer partitions its state"):
        save_checkpoint(single, tmp_path / "weights", object())


def test_crash_during_save_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    model = tiny_model("mixtral")
    moeplug.patch_model(model)
    save_checkpoint(model, tmp_path / "ckpt")
    expected = model(IDS).logits.detach()
    _trained_weights(model)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("moeplug.checkpoint.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, tmp_path / "ckpt")
    fresh = tiny_model("mixtral", seed=5)
    moeplug.patch_model(fresh)
    load_checkpoint(fresh, tmp_path / "ckpt")
    torch.testing.assert_close(fresh(IDS).logits, expected, atol=0, rtol=0)
