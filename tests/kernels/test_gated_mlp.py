"""grouped_swiglu / grouped_gated_mlp: vs a per-row SwiGLU MLP oracle, Triton vs torch.

Inputs live on the ``device`` fixture (tests/conftest.py): CPU runs Triton in its interpreter, CUDA compiles it.
"""

import pytest
import torch

from kernels import grouped_gated_mlp, grouped_swiglu, use_backend

# Same reasoning as test_grouped_gemm.py: fp32 sums in another order; fp16 results ~1 rounded to 1e-3; bf16
# (8 mantissa bits) where the reference rounds gate and up before the activation and the kernel does not.
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=5e-2, rtol=2e-2),
}
SHAPES = [(1, 33, 20, 100), (7, 33, 20, 100), (100, 64, 48, 32)]  # (tokens, hidden, expert width I, out N)


def make_mlp_case(tokens, hidden, width, out, dtype, device, experts=5, top_k=2, seed=0):
    """HF-layout expert weights (gate_up [E, 2I, H], down [E, N, I]) and top-k routing; expert 1 gets no rows.

    Drawn on the CPU (the same values on every device), then moved to ``device``.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    gate_up = (torch.randn(experts, 2 * width, hidden, generator=gen) / hidden**0.5).to(dtype)
    down = (torch.randn(experts, out, width, generator=gen) / width**0.5).to(dtype)
    choice = torch.randint(0, experts - 1, (tokens * top_k,), generator=gen)
    choice[choice >= 1] += 1
    order = torch.argsort(choice, stable=True)
    offsets = torch.bincount(choice, minlength=experts).cumsum(0)
    gates = torch.rand(tokens * top_k, generator=gen).to(dtype)[order]
    return tuple(t.to(device) for t in (x, gate_up, down, offsets, order // top_k, order, gates))


def per_row_mlp(x, gate_up, down, offsets, gather, scatter, gates):
    """Mixtral's expert MLP written out for one grouped row at a time, on HF-layout weights."""
    ends = offsets.tolist()
    out = [None] * ends[-1]
    expert = 0
    for s in range(ends[-1]):
        while s >= ends[expert]:
            expert += 1
        gate, up = (x[gather[s]] @ gate_up[expert].t()).chunk(2)
        out[int(scatter[s])] = (torch.nn.functional.silu(gate) * up) @ down[expert].t() * gates[s]
    return torch.stack(out)


def run_mlp(x, gate_up, down, offsets, gather, scatter, gates):
    return grouped_gated_mlp(
        x, gate_up.transpose(1, 2), down.transpose(1, 2), offsets,
        gather_index=gather, scatter_index=scatter, gates=gates,
    )  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", SHAPES)
def test_mlp_and_gradients_match_per_row_oracle(shape, backend, device):
    case = make_mlp_case(*shape, torch.float32, device)
    x, gate_up, down, gates = (case[i].clone().requires_grad_() for i in (0, 1, 2, 6))
    args = (x, gate_up, down, case[3], case[4], case[5], gates)
    grad = torch.randn(case[4].shape[0], shape[3]).to(device)
    with use_backend(backend):
        out = run_mlp(*args)
        got = torch.autograd.grad(out, (x, gate_up, down, gates), grad)
    expected_out = per_row_mlp(*args)
    expected = torch.autograd.grad(expected_out, (x, gate_up, down, gates), grad)
    torch.testing.assert_close(out, expected_out, **TOL[torch.float32])
    for name, a, b in zip(("x", "gate_up", "down", "gates"), got, expected):
        torch.testing.assert_close(a, b, **TOL[torch.float32], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_swiglu_triton_matches_torch(shape, dtype, device):
    x, gate_up, _, offsets, gather, _, _ = make_mlp_case(*shape, dtype, device)
    results = []
    for backend in ("torch", "triton"):
        with use_backend(backend):
            results.append(grouped_swiglu(x, gate_up.transpose(1, 2), offsets, gather_index=gather))
    torch.testing.assert_close(results[1], results[0], **TOL[dtype])


def test_odd_gate_up_width_is_rejected():
    x, gate_up, _, offsets, gather, _, _ = make_mlp_case(7, 33, 20, 100, torch.float32, "cpu")
    with pytest.raises(ValueError, match="must be 2I .* got 39"):
        grouped_swiglu(x, gate_up[:, :-1].transpose(1, 2), offsets, gather_index=gather)


def test_op_registration(device):
    x, gate_up, _, offsets, gather, _, _ = make_mlp_case(7, 32, 16, 48, torch.float32, device)
    args = (x, gate_up.transpose(1, 2), offsets, gather)
    # No autograd kernel on the op (grouped_swiglu's autograd.Function differentiates it): see test_grouped_gemm.
    torch.library.opcheck(torch.ops.moeplug_kernels.grouped_swiglu.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
