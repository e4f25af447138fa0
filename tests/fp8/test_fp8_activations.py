"""FP8 activation compression: gradients vs uncompressed (SQNR), memory, what is left alone, hook hygiene."""

import pytest
import torch
import transformers

import moeplug
from moeplug.fp8 import compress_activations, with_attention
from moeplug.tiny import tiny_model


def _tiny_llama():
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _grads(model, ids):
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return (10 * torch.log10(reference.pow(2).sum() / (approx - reference).pow(2).sum())).item()


@pytest.mark.parametrize("make_model", [
    _tiny_llama,
    lambda: tiny_model("mixtral").train(),
    lambda: (lambda m: (moeplug.patch_model(m), m)[1])(tiny_model("mixtral").train()),
], ids=["llama", "mixtral", "mixtral-patched"])
def test_gradients_keep_20db_sqnr_and_activations_shrink(make_model):
    model = make_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(0))
    reference = _grads(model, ids)
    compressor = compress_activations(model)
    compressed = _grads(model, ids)
    compressor.remove()
    assert reference.keys() == compressed.keys()
    worst = min(_sqnr_db(reference[name], compressed[name]) for name in reference)
    # Measured worst parameter (the issue asks for >= 20 dB): Llama 29.2 dB, Mixtral 25.1 dB, patched
    # Mixtral 23.7 dB; compressed activations are 0.27-0.28x of what they replace.
    assert worst >= 20.0, worst
    assert compressor.original_bytes > 0
    assert compressor.packed_bytes <= 0.30 * compressor.original_bytes


def test_leaves_integer_tensors_parameters_and_small_tensors_alone():
    embedding = torch.nn.Embedding(100, 64)  # saves int64 indices and its weight (a parameter)
    compressor = compress_activations(embedding, lambda name, module: "group")
    embedding(torch.randint(0, 100, (4, 50))).sum().backward()
    assert compressor.packed_bytes == 0

    linear = torch.nn.Linear(8, 8)  # a 4x8 input is under min_numel
    compressor = compress_activations(linear, lambda name, module: "tensor", min_numel=64)
    linear(torch.randn(4, 8)).sum().backward()
    assert compressor.packed_bytes == 0
    linear(torch.randn(16, 8)).sum().backward()
    assert compressor.packed_bytes == 16 * 8 + 4  # E4M3 codes plus one fp32 scale


def test_shared_input_is_packed_once_and_weights_never():
    layers = torch.nn.ModuleList([torch.nn.Linear(64, 64) for _ in range(3)])  # 4096-value weights
    compressor = compress_activations(layers, lambda name, module: "tensor" if name else None)
    x = torch.randn(4, 50, 64, requires_grad=True) * 1.0  # not a leaf: an activation
    sum(layer(x).sum() for layer in layers).backward()  # each layer saves a 2-D view of x and of its weight
    assert compressor.packed_bytes == 4 * 50 * 64 + 4  # x once (codes + one fp32 scale), no weight


def test_hooks_are_popped_after_errors_and_removed_on_request():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU())
    compressor = compress_activations(model)
    with pytest.raises(RuntimeError):
        model(torch.randn(3, 65))  # shape error inside a hooked module
    x = torch.randn(32, 64, requires_grad=True)
    (x * 2).exp().sum().backward()  # exp saves 2048 values outside any hooked module: must stay plain
    assert compressor.packed_bytes == 0
    model(x).sum().backward()
    assert compressor.packed_bytes > 0
    compressor.remove()
    compressor.reset_stats()
    model(x).sum().backward()
    assert compressor.packed_bytes == 0


def test_bad_selection_value_is_named():
    with pytest.raises(ValueError, match="'fp8'"):
        compress_activations(torch.nn.Linear(2, 2), lambda name, module: "fp8")


def test_sdpa_mode_saves_nothing_large_uncompressed_in_attention_and_keeps_20db():
    """with_attention: q/k/v in FP8 and the attention output recomputed (test_fp8_attention.py)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
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
    assert torch.nn.functional.scaled_dot_product_attention is sdpa  # restored after each attention forward
    # Uncompressed, sdpa would save q, k, v, its output and logsumexp (12,800 values for q here).
    assert max(plain_saved, default=0) < compressor.min_numel, plain_saved
    worst = min(_sqnr_db(r, compressed[n]) for n, r in reference.items())
    # Measured 27.0 dB here (24.6 dB on benchmarks/fp8_memory.py's h256 model); the issue asks for 20.
    assert worst >= 20.0, worst
