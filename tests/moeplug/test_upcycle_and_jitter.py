"""Oracles for two documented features: `moeplug.upcycle` (the upcycled MoE model computes the dense
transformers model's outputs at initialisation) and `MoEConfig(jitter=...)` (multiplicative uniform noise
on the router's input during training, never on the experts' input, none in eval)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

import moeplug
from moeplug import MoEConfig, MoELayer

EPS = torch.finfo(torch.float32).eps
_DENSE = {  # awkward sizes on purpose
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen3": ("Qwen3Config", {"head_dim": 12}),
}


def _dense(family: str) -> transformers.PreTrainedModel:
    class_name, extra = _DENSE[family]
    config = getattr(transformers, class_name)(
        vocab_size=97, hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, **extra)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", list(_DENSE))
@pytest.mark.parametrize("num_experts, top_k", [(4, 1), (4, 2), (6, 3)])
def test_upcycled_model_computes_the_dense_models_outputs(family, num_experts, top_k, tmp_path):
    dense = _dense(family)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    moe = moeplug.upcycle(dense, num_experts=num_experts, top_k=top_k)
    assert type(moe).__name__ == {"qwen3": "Qwen3MoeForCausalLM"}.get(family, "MixtralForCausalLM")
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())  # dense model untouched
    ids = _ids()
    with torch.no_grad():
        expected = dense(ids).logits
        got = moe(ids).logits
    # Each MoE MLP returns sum_k w_k·MLP(x) with the k renormalised weights summing to 1 up to rounding
    # (w_k = p_k / sum p), so per layer the MLP output is off by ~k·eps relative; through the residual
    # stream and 3 layers that stays within layers·k·eps·8 of the logit scale (measured: ~1e-7 abs).
    tol = 8 * dense.config.num_hidden_layers * top_k * EPS * expected.abs().max().item()
    torch.testing.assert_close(got, expected, atol=tol, rtol=0)
    # The routers are random, not uniform: the match is the renormalised copies, not a degenerate router.
    router = moe.model.layers[0].mlp.gate.weight
    assert router.std() > 0.01
    if (num_experts, top_k) != (4, 2):
        return
    # A standard transformers model: save/load gives it back; patched by moeplug, still the dense outputs.
    moe.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    moeplug.patch_model(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=tol, rtol=0)


def test_upcycle_refuses_what_it_cannot_copy():
    dense = _dense("llama")
    with pytest.raises(ValueError, match="top_k=5"):
        moeplug.upcycle(dense, num_experts=4, top_k=5)
    dense.config.mlp_bias = True
    with pytest.raises(ValueError, match="mlp_bias=True"):
        moeplug.upcycle(dense, num_experts=4, top_k=2)


# ---------------------------------------------------------------------------------------------------
# Router jitter
# ---------------------------------------------------------------------------------------------------


def _layer(jitter: float) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=5, top_k=2, hidden_size=24, intermediate_size=20, jitter=jitter,
                               aux_loss_coef=0.0))
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5)
    return layer


def _hand_moe(layer: MoELayer, tokens: torch.Tensor, router_in: torch.Tensor) -> torch.Tensor:
    """Oracle, one token at a time: gates from softmax(router(router_in)) top-k renormalised; each chosen
    expert's SwiGLU applied to the token itself (not to router_in)."""
    out = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        probs = torch.softmax(layer.router.weight @ router_in[t], dim=-1)
        top = probs.topk(layer.config.top_k)
        weights = top.values / top.values.sum()
        for w, e in zip(weights, top.indices.tolist()):
            gate, up = (layer.experts.gate_up_proj[e] @ tokens[t]).chunk(2)
            out[t] += w * (layer.experts.down_proj[e] @ (F.silu(gate) * up))
    return out


def _router_inputs(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seen = []
    handle = layer.router.register_forward_hook(lambda module, args, output: seen.append(args[0].detach()))
    with torch.no_grad():
        out = layer(x)
    handle.remove()
    return out, seen[0]


def test_jitter_scales_only_the_router_input_by_uniform_factors_in_training():
    jitter = 0.2
    layer = _layer(jitter).train()
    x = torch.randn(3, 400, 24, generator=torch.Generator().manual_seed(2)) + 0.5
    tokens = x.reshape(-1, 24)
    out, router_in = _router_inputs(layer, x)
    factor = router_in / tokens
    # What jitter means: an independent factor per element, uniform on [1 - j, 1 + j] (fp32 rounding of the
    # product allows a few eps around the ends).
    assert (factor >= 1 - jitter - 4 * EPS).all() and (factor <= 1 + jitter + 4 * EPS).all()
    # Uniform on [1-j, 1+j]: mean 1, variance j²/3. n = 28,800 samples: the mean's standard error is
    # j/sqrt(3n) = 6.8e-4, the variance's ~j²·sqrt(4/(45n)) = 7e-5; 5 sigma each.
    n = factor.numel()
    assert abs(factor.mean().item() - 1) < 5 * jitter / (3 * n) ** 0.5
    assert abs(factor.var().item() - jitter**2 / 3) < 5 * jitter**2 * (4 / (45 * n)) ** 0.5
    # Independent per element: the factors of neighbouring hidden units are uncorrelated (|r| < 5/sqrt(n)).
    flat = factor.reshape(-1, 24)
    r = torch.corrcoef(torch.stack([flat[:, 0], flat[:, 1]]))[0, 1].item()
    assert abs(r) < 5 / flat.shape[0] ** 0.5
    # The layer's output: gates from the jittered input, experts applied to the clean tokens.
    torch.testing.assert_close(out.reshape(-1, 24), _hand_moe(layer, tokens, router_in), atol=1e-5, rtol=1e-5)
    # Fresh noise every call.
    _, again = _router_inputs(layer, x)
    assert not torch.equal(again, router_in)


def test_jitter_is_off_in_eval_and_changes_routing_only_through_the_router():
    x = torch.randn(2, 50, 24, generator=torch.Generator().manual_seed(3))
    jittered, plain = _layer(0.3).eval(), _layer(0.0).eval()
    out, router_in = _router_inputs(jittered, x)
    assert torch.equal(router_in, x.reshape(-1, 24))  # eval: the router sees the tokens themselves
    assert torch.equal(out, _router_inputs(plain, x)[0])  # and the layer is the jitter-free one, bit for bit
    # In training the noise does reach the routing decisions (large jitter flips some top-k choices).
    jittered.train()
    _, noisy_in = _router_inputs(jittered, x)
    choices = lambda z: (z @ jittered.router.weight.T).topk(2).indices.sort(-1).values  # noqa: E731
    assert (choices(noisy_in) != choices(x.reshape(-1, 24))).any()


def test_jitter_outside_its_range_is_refused():
    with pytest.raises(ValueError, match="jitter=1.0"):
        MoEConfig(jitter=1.0)
