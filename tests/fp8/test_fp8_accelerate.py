"""FP8AdamW through Accelerate's prepare + gradient accumulation equals the plain PyTorch loop."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from moeplug.fp8 import FP8AdamW


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(96, 80), torch.nn.GELU(), torch.nn.Linear(80, 40))


def _batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 96, generator=generator), torch.randn(8, 40, generator=generator)) for _ in range(8)]


def test_accelerate_prepare_with_accumulation_matches_plain_loop():
    plain = _model()
    optimizer = FP8AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1, min_quantized_numel=1024)
    for i, (x, y) in enumerate(_batches()):
        (torch.nn.functional.mse_loss(plain(x), y) / 2).backward()
        if i % 2 == 1:
            optimizer.step()
            optimizer.zero_grad()

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = _model()
    model, prepared = accelerator.prepare(model, FP8AdamW(model.parameters(), lr=1e-2, weight_decay=0.1,
                                                          min_quantized_numel=1024))
    for x, y in _batches():
        with accelerator.accumulate(model):
            accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
            prepared.step()
            prepared.zero_grad()
    # Same fp32 math in the same order: identical parameters, and FP8 state really in use.
    for ours, theirs in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    state = prepared.optimizer.state_dict()["state"]
    assert any(t.dtype == torch.uint8 for s in state.values() for t in s.values() if torch.is_tensor(t))
