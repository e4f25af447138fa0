"""The "sdpa" compression mode: q/k/v saved in FP8, attention output recomputed in backward.

Oracles: torch's own scaled_dot_product_attention (forward bit for bit; backward through autograd on the
same dequantised q/k/v, which is what the recomputation must equal) and the uncompressed HF model.
"""

import pytest
import torch
import transformers

from moeplug.fp8 import compress_activations, with_attention
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


def _tiny_llama():
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _grads(model, ids):
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_llama_attention_saves_nothing_large_uncompressed_and_keeps_20db():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 100), generator=torch.Generator().manual_seed(0))
    reference = _grads(model, ids)

    compressor = compress_activations(model, with_attention)
    attention = model.model.layers[0].self_attn
    plain_saved = []

    def keep(t):
        if t.is_floating_point() and not isinstance(t, torch.nn.Parameter):
            plain_saved.append(t.numel())
        return t

    def count(module, args):  # pushed before the compressor's hooks: sees only what they leave alone
        hooks = torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t)
        hooks.__enter__()
        stack.append(hooks)

    stack = []
    handles = [attention.register_forward_pre_hook(count, prepend=True),
               attention.register_forward_hook(lambda *a: stack.pop().__exit__(None, None, None))]
    compressed = _grads(model, ids)
    for handle in handles:
        handle.remove()
    assert torch.nn.functional.scaled_dot_product_attention is SDPA  # restored after each attention forward
    # Uncompressed, sdpa would save q, k, v, its output and logsumexp (25,600 values and more each).
    assert max(plain_saved, default=0) < compressor.min_numel, plain_saved
    worst = min((10 * torch.log10(r.pow(2).sum() / (compressed[n] - r).pow(2).sum())).item()
                for n, r in reference.items())
    # Measured 27.0 dB here (24.6 dB on benchmarks/fp8_memory.py's h256 model); the issue asks for 20.
    assert worst >= 20.0, worst
