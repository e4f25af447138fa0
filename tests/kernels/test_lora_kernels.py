"""lora_shrink / lora_expand: torch reference vs PEFT-style dense math per row, Triton vs the reference.

Inputs live on the ``device`` fixture (tests/conftest.py): CPU runs Triton in its interpreter, CUDA compiles it.
"""

import math

import pytest
import torch

from kernels import LoRASegments, PagedLoRA, add_lora, lora_expand, lora_shrink, use_backend
from kernels.lora import PagedExpertLoRA, add_expert_lora

K_DIM, N_DIM, SLOT_WIDTH = 100, 33, 16  # both span several 16-wide slots, the last one partly
RANKS = [1, 8, 16, 64, 8]  # adapter 4 gets no rows in any batch below
# fp32: same math, other summation order. fp16: values ~1 rounded to fp16 (spacing 1e-3) a few times.
# bf16 (spacing 0.06 near 12, the largest outputs) checks the kernels' upcast around the interpreter's wrong bf16
# tl.dot on the CPU, and the real bf16 tl.dot (exact products, fp32 sums) on a GPU.
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=5e-2, rtol=2e-2),
}


def make_paged_adapters(ranks, dtype, device, table_rank=None, table_dtype=torch.int64, seed=0):
    """PEFT-shaped ``lora_A [r, K]`` and ``lora_B [N, r]`` per adapter, scattered over shuffled pool slots.

    Unused slots and the tail of each last chunk hold random values, and table entries past each rank
    hold -1, so reading anything the layout does not name shows up as a wrong result or an error.
    Drawn on the CPU (the same values on every device); the paged tensors are moved to ``device``.
    """
    gen = torch.Generator().manual_seed(seed)
    ck, cn = math.ceil(K_DIM / SLOT_WIDTH), math.ceil(N_DIM / SLOT_WIDTH)
    table_rank = table_rank or max(ranks)
    pool = torch.randn(sum(ranks) * (ck + cn) + 17, SLOT_WIDTH, generator=gen)
    free = torch.randperm(pool.shape[0], generator=gen)
    a_table = torch.full((len(ranks), table_rank * ck), -1, dtype=table_dtype)
    b_table = torch.full((len(ranks), table_rank * cn), -1, dtype=table_dtype)
    lora_a, lora_b = [], []
    for adapter, r in enumerate(ranks):
        a = torch.randn(r, K_DIM, generator=gen) / K_DIM**0.5
        b = torch.randn(N_DIM, r, generator=gen) / r**0.5
        for table, rows, chunks in ((a_table, a, ck), (b_table, b.t(), cn)):
            slots, free = free[: r * chunks], free[r * chunks :]
            padded = torch.randn(r, chunks * SLOT_WIDTH, generator=gen)
            padded[:, : rows.shape[1]] = rows
            pool[slots] = padded.reshape(r * chunks, SLOT_WIDTH)
            table[adapter, : r * chunks] = slots
        lora_a.append(a.to(dtype))
        lora_b.append(b.to(dtype))
    ranks_t = torch.tensor(ranks)
    scales = 2.0 / ranks_t.double().sqrt()  # rsLoRA-style alpha / sqrt(r)
    paged = (pool.to(dtype), a_table, b_table, ranks_t, scales.float())
    return (*(t.to(device) for t in paged), lora_a, lora_b)


def make_batch(tokens, layout, dtype, device, seed=1):
    """Rows with adapters 0-3 and -1 (base model): decode-like mixed order, or prefill-like segments."""
    gen = torch.Generator().manual_seed(seed)
    row_adapter = torch.randint(-1, 4, (tokens,), generator=gen)
    if layout == "segments":
        row_adapter = row_adapter.sort().values
    x = torch.randn(tokens, K_DIM, generator=gen).to(dtype)
    y = torch.randn(tokens, N_DIM, generator=gen).to(dtype)
    return x.to(device), y.to(device), row_adapter.to(device)


def apply_lora(x, y, row_adapter, pool, a_table, b_table, ranks, scales):
    v = lora_shrink(x, pool, a_table, ranks, row_adapter)
    return v, lora_expand(y.clone(), v, pool, b_table, ranks, scales, row_adapter)


@pytest.mark.parametrize("layout", ["mixed", "segments"])
@pytest.mark.parametrize("tokens", [1, 7, 100])
def test_reference_matches_dense_peft_math_per_row(tokens, layout, device):
    pool, a_table, b_table, ranks, scales, lora_a, lora_b = make_paged_adapters(RANKS, torch.float32, device)
    x, y, row_adapter = make_batch(tokens, layout, torch.float32, device)
    with use_backend("torch"):
        v, out = apply_lora(x, y, row_adapter, pool, a_table, b_table, ranks, scales)
    expected_v, expected_y = torch.zeros_like(v), y.clone()
    for t, a in enumerate(row_adapter.tolist()):
        if a >= 0:  # PEFT: base(x) + lora_B(lora_A(x)) * scaling
            lora_a_t, lora_b_t = lora_a[a].t().to(device), lora_b[a].t().to(device)
            expected_v[t, : RANKS[a]] = x[t] @ lora_a_t
            expected_y[t] += x[t] @ lora_a_t @ lora_b_t * scales[a]
    torch.testing.assert_close(v, expected_v, **TOL[torch.float32])
    torch.testing.assert_close(out, expected_y, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["mixed", "segments"])
@pytest.mark.parametrize("tokens", [1, 7, 100])
def test_triton_matches_reference(tokens, layout, dtype, device):
    paged = make_paged_adapters(RANKS, dtype, device, table_dtype=torch.int32)[:5]
    x, y, row_adapter = make_batch(tokens, layout, dtype, device)
    with use_backend("torch"):
        expected = apply_lora(x, y, row_adapter, *paged)
    with use_backend("triton"):
        got = apply_lora(x, y, row_adapter, *paged)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_triton_finds_each_segment_among_many_adapters(device):
    # 150 adapters, most without rows in the batch: each program scans every adapter's segment end.
    ranks = [1 + i % 8 for i in range(150)]
    paged = make_paged_adapters(ranks, torch.float32, device)[:5]
    x, y, _ = make_batch(90, "mixed", torch.float32, device)
    row_adapter = torch.randint(-1, 150, (90,), generator=torch.Generator().manual_seed(3)).to(device)
    with use_backend("torch"):
        expected = apply_lora(x, y, row_adapter, *paged)
    with use_backend("triton"):
        got = apply_lora(x, y, row_adapter, *paged)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_triton_sees_row_adapter_changed_in_place(device):
    # A row_adapter tensor is grouped per call (nothing is cached across calls): an in-place change is seen.
    paged = make_paged_adapters(RANKS, torch.float32, device)[:5]
    x, y, row_adapter = make_batch(40, "mixed", torch.float32, device)
    with use_backend("triton"):
        apply_lora(x, y, row_adapter, *paged)
        row_adapter.copy_(row_adapter.roll(1))
        got = apply_lora(x, y, row_adapter, *paged)
    with use_backend("torch"):
        expected = apply_lora(x, y, row_adapter, *paged)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_table_padding_does_not_change_the_result(backend, device):
    x, y, row_adapter = make_batch(7, "mixed", torch.float32, device)
    tight, wide = (make_paged_adapters(RANKS, torch.float32, device, table_rank=r)[:5] for r in (None, 80))
    with use_backend(backend):
        v_tight, y_tight = apply_lora(x, y, row_adapter, *tight)
        v_wide, y_wide = apply_lora(x, y, row_adapter, *wide)
    assert v_wide.shape == (7, 80) and not v_wide[:, 64:].any()
    torch.testing.assert_close(v_wide[:, :64], v_tight, **TOL[torch.float32])
    torch.testing.assert_close(y_wide, y_tight, **TOL[torch.float32])


def test_base_model_rows_are_untouched_by_both_backends(device):
    paged = make_paged_adapters(RANKS, torch.float32, device)[:5]
    x, y, _ = make_batch(7, "mixed", torch.float32, device)
    row_adapter = torch.tensor([-1, 2, -1, -1, 0, -1, -1], device=device)
    for backend in ("torch", "triton"):
        with use_backend(backend):
            v, out = apply_lora(x, y, row_adapter, *paged)
        base = row_adapter < 0
        assert not v[base].any()
        assert torch.equal(out[base], y[base])
        assert not torch.equal(out[~base], y[~base])


def test_bad_input_names_value_and_expectation():
    # CPU tensors on every device: values are only checked where reading them cannot stall a GPU.
    pool, a_table, b_table, ranks, scales, _, _ = make_paged_adapters(RANKS, torch.float32, "cpu")
    x, y, row_adapter = make_batch(7, "mixed", torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"row_adapter values must lie in \[-1, 4\], got min -1 max 5"):
        lora_shrink(x, pool, a_table, ranks, torch.full_like(row_adapter, 5).index_fill_(0, torch.tensor([0]), -1))
    with pytest.raises(ValueError, match=r"ranks must lie in \[0, 64\]"):
        lora_shrink(x, pool, a_table, ranks * 2, row_adapter)
    with pytest.raises(ValueError, match="pool must be .* torch.float32 .* got .* torch.float16"):
        lora_shrink(x, pool.half(), a_table, ranks, row_adapter)
    with pytest.raises(ValueError, match=r"a_table must be .* \[num_adapters, max_rank \* 7\]"):
        lora_shrink(x, pool, a_table[:, :-1], ranks, row_adapter)
    broken = a_table.clone()
    broken[0, 0] = pool.shape[0]
    with pytest.raises(ValueError, match=r"a_table\[0\] names slots outside the pool"):
        lora_shrink(x, pool, broken, ranks, torch.zeros_like(row_adapter))
    v = lora_shrink(x, pool, a_table, ranks, row_adapter)
    with pytest.raises(ValueError, match=r"v must be \[T=7, R>=64\]"):
        lora_expand(y, v[:, :8], pool, b_table, ranks, scales, row_adapter)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "mixed"])
def test_segments_from_host_rows_equal_those_from_a_tensor(packed, device):
    rows = torch.randint(-1, 5, (40,), generator=torch.Generator().manual_seed(4))
    rows = rows.sort().values if packed else rows
    host, tensor = LoRASegments(rows.tolist(), 6, device), LoRASegments(rows.to(device), 6)
    assert host.packed == tensor.packed == packed
    assert host.runs == tensor.runs
    assert [a for a, _, _ in host.runs] == sorted(set(rows.tolist()) - {-1})
    assert torch.equal(host.row_order, tensor.row_order) and torch.equal(host.ends, tensor.ends)
    assert host.ends.tolist()[-1] == 40 and host.ends.shape == (7,)
    for adapter, start, stop in host.runs:  # a run's positions are exactly that adapter's rows
        assert rows[host.row_order[start:stop].cpu()].eq(adapter).all()
    with pytest.raises(ValueError, match=r"row_adapter values must lie in \[-1, 5\], got min -1 max 6"):
        LoRASegments([-1, 6], 6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("scattered", [False, True], ids=["pool-views", "scattered-slots"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "mixed"])
def test_add_lora_over_paged_tables_matches_dense_peft_math(backend, scattered, packed, device):
    """``PagedLoRA`` + ``add_lora`` (what a serving layer calls) per row against base + scale * x A^T B^T."""
    gen = torch.Generator().manual_seed(5)
    pool = torch.randn(600, SLOT_WIDTH, generator=gen)
    tables = PagedLoRA(pool.to(device), K_DIM, N_DIM, capacity=5)
    dense, first = {}, 0
    for index, rank in enumerate([3, 16, 8]):  # index 3 and 4 stay empty
        a, b = torch.randn(rank, K_DIM, generator=gen), torch.randn(N_DIM, rank, generator=gen)
        slots = torch.arange(first, first + tables.slots_needed(rank))
        first += slots.numel() + 7
        slots = slots[torch.randperm(slots.numel(), generator=gen)] if scattered else slots
        tables.pool[slots.to(device)] = tables.pack(a, b).to(device)
        tables.set_adapter(index, slots, rank, scale=0.25 * (index + 1))
        dense[index] = (a, b, 0.25 * (index + 1))
    rows = torch.randint(-1, 3, (23,), generator=gen)
    rows = rows.sort().values if packed else rows
    x, y = torch.randn(23, K_DIM, generator=gen), torch.randn(23, N_DIM, generator=gen)
    expected = y.clone()
    for t, index in enumerate(rows.tolist()):
        if index >= 0:
            a, b, scale = dense[index]
            expected[t] += scale * (x[t] @ a.t() @ b.t())
    with use_backend(backend):
        got = add_lora(y.to(device), x.to(device), tables, LoRASegments(rows.tolist(), 5, device))
    torch.testing.assert_close(got.cpu(), expected, **TOL[torch.float32])
    assert tables.num_set == 3 and tables.is_set(2) and not tables.is_set(3)
    tables.clear_adapter(2)
    assert tables.num_set == 2 and tables.adapter_weights(2) is None


def _expert_lora(device, ranks, num_experts, capacity, dtype=torch.float32, scattered=False):
    """A ``PagedExpertLoRA`` over a random pool with one adapter of rank ``ranks[i]`` at index i on every expert
    (``None``: index left empty), and the dense ``(A [E, r, K], B [E, N, r], scale)`` the oracle reads."""
    gen = torch.Generator().manual_seed(6)
    pool = torch.randn(2000, SLOT_WIDTH, generator=gen).to(dtype)
    tables = PagedExpertLoRA(PagedLoRA(pool.to(device), K_DIM, N_DIM, capacity * num_experts), num_experts)
    dense, first = {}, 0
    for index, rank in enumerate(ranks):
        if rank is None:
            continue
        a = torch.randn(num_experts, rank, K_DIM, generator=gen).to(dtype) / K_DIM**0.5
        b = torch.randn(num_experts, N_DIM, rank, generator=gen).to(dtype)
        slots = torch.arange(first, first + tables.slots_needed(rank))
        first += slots.numel() + 5
        slots = slots[torch.randperm(slots.numel(), generator=gen)] if scattered else slots
        tables.paged.pool[slots.to(device)] = tables.pack(a, b).to(device)
        tables.set_adapter(index, slots, rank, scale=0.5 + index)
        dense[index] = (a, b, 0.5 + index)
    return tables, dense


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("scattered", [False, True], ids=["pool-views", "scattered-slots"])
@pytest.mark.parametrize("pairs", [1, 7, 60])
def test_expert_lora_matches_dense_math_per_pair(backend, scattered, pairs, device):
    """Each (row, expert) pair adds its row's adapter's expert-e LoRA: ``scale_a · x A_{a,e}ᵀ B_{a,e}ᵀ``.

    Adapters of ranks 2, 9 and 16 plus an empty index (3) and base rows (-1) in one batch; 5 experts, of which
    expert 4 gets no pair. fp32 tolerance as the other ops (same math, another summation order)."""
    num_experts = 5
    tables, dense = _expert_lora(device, [2, 9, 16, None], num_experts, capacity=4, scattered=scattered)
    gen = torch.Generator().manual_seed(pairs)
    row_adapter = torch.randint(-1, 4, (pairs,), generator=gen)
    row_expert = torch.randint(0, num_experts - 1, (pairs,), generator=gen)
    x, y = torch.randn(pairs, K_DIM, generator=gen), torch.randn(pairs, N_DIM, generator=gen)
    expected = y.clone()
    for t, (index, expert) in enumerate(zip(row_adapter.tolist(), row_expert.tolist())):
        if index in dense:
            a, b, scale = dense[index]
            expected[t] += scale * (x[t] @ a[expert].t() @ b[expert].t())
    # Sized by the indices used (0-3 of 4, as a serving step knows from its host rows) and by the capacity.
    for adapters in (int(row_adapter.max()) + 1, None):
        segments = tables.segments(row_adapter.to(device), row_expert.to(device), adapters)
        with use_backend(backend):
            got = add_expert_lora(y.clone().to(device), x.to(device), tables, segments)
        torch.testing.assert_close(got.cpu(), expected, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_expert_lora_triton_matches_torch_in_half_precision(dtype, device):
    tables, _ = _expert_lora(device, [4, 16], num_experts=3, capacity=2, dtype=dtype)
    gen = torch.Generator().manual_seed(9)
    row_adapter, row_expert = torch.randint(-1, 2, (13,), generator=gen), torch.randint(0, 3, (13,), generator=gen)
    x, y = (torch.randn(13, n, generator=gen).to(dtype).to(device) for n in (K_DIM, N_DIM))
    segments = tables.segments(row_adapter.to(device), row_expert.to(device))
    results = {}
    for backend in ("torch", "triton"):
        with use_backend(backend):
            results[backend] = add_expert_lora(y.clone(), x, tables, segments)
    torch.testing.assert_close(results["triton"], results["torch"], **TOL[dtype])


def test_expert_lora_bookkeeping_and_bad_input():
    tables, _ = _expert_lora("cpu", [3, None, 5], num_experts=4, capacity=3)
    assert tables.num_set == 2 and tables.is_set(0) and not tables.is_set(1) and tables.is_set(2)
    assert tables.slots_needed(3) == 4 * 3 * (math.ceil(K_DIM / SLOT_WIDTH) + math.ceil(N_DIM / SLOT_WIDTH))
    tables.clear_adapter(2)
    assert tables.num_set == 1 and not tables.is_set(2)
    assert tables.paged.adapter_weights(2 * 4 + 3) is None  # every expert of index 2 is cleared
    with pytest.raises(ValueError, match=r"expert LoRA needs A \(4, 3, 100\) and B \(4, 33, 3\).*got \(3, 3, 100\)"):
        tables.pack(torch.zeros(3, 3, K_DIM), torch.zeros(4, N_DIM, 3))
    with pytest.raises(ValueError, match="needs 120 slots, got 5"):
        tables.set_adapter(1, torch.arange(5), 3, 1.0)
    with pytest.raises(ValueError, match="cannot hold 4 experts"):
        PagedExpertLoRA(PagedLoRA(torch.zeros(8, SLOT_WIDTH), K_DIM, N_DIM, 6), 4)
    assert LoRASegments([-1, 2, 0], 5).adapters_used == 3 and LoRASegments([-1], 5).adapters_used == 0
    with pytest.raises(ValueError, match="must be 1-D of one length"):
        tables.segments(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    segments = tables.segments(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"tables are for 100 -> 33, got 33 -> 33"):
        add_expert_lora(torch.zeros(2, N_DIM), torch.zeros(2, N_DIM), tables, segments)
