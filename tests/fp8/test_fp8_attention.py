"""The "sdpa" compression mode: q/k/v saved in FP8, attention output recomputed in backward.

Oracle: torch's own scaled_dot_product_attention (forward bit for bit; backward through autograd on the
same dequantised q/k/v, which is what the recomputation must equal). The mode on a whole HF model, against
the uncompressed model, is tested in test_fp8_activations.py.
"""

import pytest
import torch

from moeplug.fp8 import compress_activations
from moeplug.fp8.activations import _fp8_sdpa, _pack_groupwise, _unpack

SDPA = torch.nn.functional.scaled_dot_product_attention


def _qkv(seed=0):
    gen = torch.Generator().manual_seed(seed)
    # GQA (4 query heads, 2 kv heads), a length that is not a multiple of anything, head_dim 16.
    shapes = [(2, 4, 37, 16), (2, 2, 37, 16), (2, 2, 37, 16)]
    return [(torch.randn(s, generator=gen) * 2).requires_grad_() for s in shapes]


def test_recomputed_attention_is_sdpa_forward_and_autograd_on_dequantised_inputs():
    compressor = compress_activations(torch.nn.Identity())  # supplies group size, min_numel and the stats
    fp8_sdpa = _fp8_sdpa(compressor)
    q, k, v = _qkv()
    options = dict(is_causal=True, enable_gqa=True)
    out = fp8_sdpa(q, k, v, **options)
    assert torch.equal(out, SDPA(q, k, v, **options))  # forward runs on the original inputs
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    restored = [_unpack(_pack_groupwise(t, 16)).requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(SDPA(*restored, **options), restored, grad_out)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # same ops on the same inputs
    assert compressor.packed_bytes == sum(t.numel() + t.numel() // 16 * 2 for t in (q, k, v))  # codes + bf16 scales


def test_dropout_and_no_grad_calls_run_plain_sdpa():
    compressor = compress_activations(torch.nn.Identity())
    fp8_sdpa = _fp8_sdpa(compressor)
    q, k, v = _qkv(1)
    torch.manual_seed(0)
    with_dropout = fp8_sdpa(q, k, v, dropout_p=0.5, enable_gqa=True)
    torch.manual_seed(0)
    assert torch.equal(with_dropout, SDPA(q, k, v, dropout_p=0.5, enable_gqa=True))
    with torch.no_grad():
        fp8_sdpa(q, k, v, enable_gqa=True)
    assert compressor.packed_bytes == 0
