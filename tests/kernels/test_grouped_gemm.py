"""grouped_mm: torch reference vs a per-row oracle, Triton vs the reference, gradients.

Inputs live on the ``device`` fixture (tests/conftest.py): CPU runs Triton in its interpreter, CUDA compiles it.
"""

import pytest
import torch

from kernels import grouped_mm, use_backend

# fp32: both sides accumulate in fp32 in a different order. fp16: both accumulate in fp32 and round the
# result (values ~1) to fp16, whose spacing near 1 is 1e-3; a few roundings apart is within 1e-2.
# bf16 keeps 8 bits of mantissa (spacing 0.03 near 4). The interpreter's bf16 tl.dot is wrong (measured; ../shared/DESIGN.md),
# so the kernels upcast bf16 tiles there (the bf16 cases check that workaround); on a GPU they run tl.dot on
# bf16 tiles, which also multiplies exactly and accumulates in fp32, so the same tolerances apply.
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=5e-2, rtol=2e-2),
}
SHAPES = [(1, 33, 100), (7, 33, 100), (100, 64, 48)]  # (tokens, K, N): K, N not multiples of any block
MODES = ["grouped", "gather", "gather_scatter_gates"]


def make_case(tokens, k_dim, n_dim, dtype, device, experts=5, top_k=2, seed=0):
    """Top-k routed tokens in which expert 1 (and often others) gets no rows; weight in HF's [E, N, K].

    Drawn on the CPU (the same values on every device), then moved to ``device``.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k_dim, generator=gen).to(dtype)
    w_hf = (torch.randn(experts, n_dim, k_dim, generator=gen) / k_dim**0.5).to(dtype)
    choice = torch.randint(0, experts - 1, (tokens * top_k,), generator=gen)
    choice[choice >= 1] += 1  # expert 1 never chosen
    order = torch.argsort(choice, stable=True)  # sorted slot -> token-major slot
    offsets = torch.bincount(choice, minlength=experts).cumsum(0)
    gates = torch.rand(tokens * top_k, generator=gen).to(dtype)[order]
    return tuple(t.to(device) for t in (x, w_hf, offsets, order // top_k, order, gates))


def mode_args(mode, x, gather, scatter, gates):
    """(x, kwargs) for one calling mode; 'grouped' passes x already in grouped order."""
    if mode == "grouped":
        return x[gather], {}
    if mode == "gather":
        return x, dict(gather_index=gather)
    return x, dict(gather_index=gather, scatter_index=scatter, gates=gates)


def per_row_oracle(x, weight, offsets, gather_index=None, scatter_index=None, gates=None):
    """One vector-matrix product per grouped row, placed by hand: independent of both implementations."""
    ends = offsets.tolist()
    out = [None] * ends[-1]
    expert = 0
    for s in range(ends[-1]):
        while s >= ends[expert]:
            expert += 1
        row = x[s if gather_index is None else int(gather_index[s])] @ weight[expert]
        out[s if scatter_index is None else int(scatter_index[s])] = row if gates is None else row * gates[s]
    return torch.stack(out)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["hf_transposed", "contiguous"])
def test_reference_matches_per_row_oracle(shape, mode, layout, device):
    x, w_hf, offsets, gather, scatter, gates = make_case(*shape, torch.float32, device)
    weight = w_hf.transpose(1, 2) if layout == "hf_transposed" else w_hf.transpose(1, 2).contiguous()
    x_in, kwargs = mode_args(mode, x, gather, scatter, gates)
    with use_backend("torch"):
        out = grouped_mm(x_in, weight, offsets, **kwargs)
    torch.testing.assert_close(out, per_row_oracle(x_in, weight, offsets, **kwargs), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(shape, mode, dtype, device):
    x, w_hf, offsets, gather, scatter, gates = make_case(*shape, dtype, device)
    x_in, kwargs = mode_args(mode, x, gather, scatter, gates)
    with use_backend("torch"):
        expected = grouped_mm(x_in, w_hf.transpose(1, 2), offsets, **kwargs)
    with use_backend("triton"):
        out = grouped_mm(x_in, w_hf.transpose(1, 2), offsets, **kwargs)
    torch.testing.assert_close(out, expected, **TOL[dtype])


@pytest.mark.parametrize("experts", [2, 37, pytest.param(300, marks=pytest.mark.slow)])
def test_triton_finds_each_block_among_many_experts(experts, device):
    # Rows land in few of many experts (most empty, not a power of two): the kernel locates its block by
    # scanning all experts' row ends, so empty runs and a wide lookup must still place every row.
    x, w_hf, offsets, gather, scatter, gates = make_case(150, 32, 40, torch.float32, device, experts=experts)
    oracle = per_row_oracle(x.cpu(), w_hf.transpose(1, 2).cpu(), offsets.cpu(), gather.cpu(), scatter.cpu(), gates.cpu())
    with use_backend("triton"):
        out = grouped_mm(x, w_hf.transpose(1, 2), offsets, gather_index=gather, scatter_index=scatter, gates=gates)
    torch.testing.assert_close(out.cpu(), oracle, **TOL[torch.float32])


def _grads(fn, x, w_hf, gates, grad_out):
    x, w_hf, gates = (t.detach().requires_grad_() for t in (x, w_hf, gates))
    out = fn(x, w_hf.transpose(1, 2), gates)
    return (out, *torch.autograd.grad(out, (x, w_hf, gates), grad_out))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(7, 33, 100), (100, 64, 48)])
def test_gradients_match_autograd_of_per_row_oracle(shape, backend, device):
    x, w_hf, offsets, gather, scatter, gates = make_case(*shape, torch.float32, device)
    grad_out = torch.randn(gather.shape[0], shape[2]).to(device)
    with use_backend(backend):
        got = _grads(
            lambda x, w, g: grouped_mm(x, w, offsets, gather_index=gather, scatter_index=scatter, gates=g),
            x, w_hf, gates, grad_out,
        )  # fmt: skip
    expected = _grads(lambda x, w, g: per_row_oracle(x, w, offsets, gather, scatter, g), x, w_hf, gates, grad_out)
    for name, a, b in zip(("out", "x", "weight", "gates"), got, expected):
        torch.testing.assert_close(a, b, **TOL[torch.float32], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_triton_gradients_match_reference(dtype, device):
    x, w_hf, offsets, gather, scatter, gates = make_case(7, 33, 100, dtype, device)
    grad_out = torch.randn(gather.shape[0], 100).to(device, dtype)
    results = []
    for backend in ("torch", "triton"):
        with use_backend(backend):
            results.append(
                _grads(
                    lambda x, w, g: grouped_mm(x, w, offsets, gather_index=gather, scatter_index=scatter, gates=g),
                    x, w_hf, gates, grad_out,
                )  # fmt: skip
            )
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_backward_accepts_expanded_gradient(device):
    """``out.sum()`` hands backward a stride-0 gradient, which torch._grouped_mm's backward rejects."""
    x, w_hf, offsets, gather, scatter, gates = make_case(7, 32, 48, torch.float32, device)
    x.requires_grad_()
    grouped_mm(x, w_hf.transpose(1, 2), offsets, gather_index=gather).sum().backward()
    expert_of_row = torch.repeat_interleave(torch.diff(offsets, prepend=torch.zeros_like(offsets[:1])))
    # d(sum of row s)/d(x row) = Σ_n W_e[:, n]: the HF weight summed over its N dimension.
    expected = torch.zeros_like(x).index_add_(0, gather, w_hf.sum(1)[expert_of_row])
    torch.testing.assert_close(x.grad, expected, **TOL[torch.float32])


# The ops carry no autograd kernel (grouped_mm's autograd.Function differentiates them), so opcheck gets
# inputs without gradients: schema, fake (meta) implementation and AOT dispatch are what it checks.
OPCHECK_TESTS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


def test_op_registration_and_compile(device):
    x, w_hf, offsets, gather, scatter, gates = make_case(7, 32, 48, torch.float32, device)
    args = (x, w_hf.transpose(1, 2), offsets, gather, scatter, gates)
    torch.library.opcheck(torch.ops.moeplug_kernels.grouped_mm.default, args, test_utils=OPCHECK_TESTS)
    dy = torch.randn(gather.shape[0], 48, generator=torch.Generator().manual_seed(1)).to(device)
    torch.library.opcheck(torch.ops.moeplug_kernels.grouped_mm_weight_grad.default,
                          (x, dy, offsets, gather, scatter, gates, True), test_utils=OPCHECK_TESTS)

    def forward_backward(run, x, w):
        x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
        out = run(x, w)
        out.backward(dy)
        return out, x.grad, w.grad

    def run(x, w):
        return grouped_mm(x, w, offsets, gather_index=gather, scatter_index=scatter, gates=gates)

    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)
    expected = forward_backward(run, x, w_hf.transpose(1, 2))
    for got, want in zip(forward_backward(compiled, x, w_hf.transpose(1, 2)), expected):
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    torch.testing.assert_close(expected[0], per_row_oracle(*args), **TOL[torch.float32])


def test_bad_input_names_value_and_expectation():
    # CPU tensors on every device: the offset values are only checked where reading them cannot stall a GPU.
    x, w_hf, offsets, gather, scatter, gates = make_case(7, 32, 48, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"expert_offsets\[-1\] = 14 must equal .* S = 13"):
        grouped_mm(x, w_hf.transpose(1, 2), offsets, gather_index=gather[:-1])
    with pytest.raises(ValueError, match="weight is torch.float16"):
        grouped_mm(x, w_hf.transpose(1, 2).half(), offsets, gather_index=gather)
    with pytest.raises(ValueError, match="gather_index must be 1-D .* torch.int64, got .* torch.int32"):
        grouped_mm(x, w_hf.transpose(1, 2), offsets, gather_index=gather.int())
    with pytest.raises(ValueError, match=r"weight must be \[E, K=32, N\]"):
        grouped_mm(x, w_hf, offsets, gather_index=gather)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_rows_at_all(backend, device):
    """Every expert empty (e.g. a rank that received no tokens): empty output, zero gradients."""
    x = torch.randn(3, 32, device=device, requires_grad=True)
    weight = torch.randn(4, 32, 48, device=device, requires_grad=True)
    none = torch.zeros(0, dtype=torch.int64, device=device)
    with use_backend(backend):
        out = grouped_mm(x, weight, none.new_zeros(4), gather_index=none, scatter_index=none)
        out.sum().backward()
    assert out.shape == (0, 48)
    assert not x.grad.any() and not weight.grad.any()
