"""Serving a compressed collection: the shared-basis op, and the engine against PEFT and the uncompressed engine.

Oracles: a per-row dense ``x (U Σ V^T)^T`` for the op; PEFT's own generate for adapters rebuilt from the
collection (``A = Σ V^T``, ``B = U``) or, lossless, for the original adapters; the engine serving the same
adapters uncompressed, in the same mixed batch. Greedy tokens must be identical: fp32 differences (~1e-6)
are far below the logit margins of the scaled-up random tiny models (see conftest.py).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from kernels.lora_shared import add_shared_lora, add_shared_lora_runs
from lora_serve import AdapterError, Engine, EngineConfig, SamplingParams
from lora_serve.cli import build_engine, parse_args
from lora_serve.collection import CompressedCollection, read_adapters
from lora_serve.compress import compress

TARGETS = ["q_proj", "v_proj", "down_proj"]
RANKS = {"c0": 2, "c1": 4, "c2": 3}
PROMPTS = [[5, 17, 33, 9, 41, 77, 12], [8, 19], [120, 3, 4], [44, 45, 46, 47], [7, 7, 7, 90, 91]]
NEW = 8


@pytest.mark.parametrize("rows", [1, 7, 100])
def test_shared_basis_ops_equal_dense_rows(rows):
    g = torch.Generator().manual_seed(rows)
    fan_in, out, c, k, n = 37, 53, 5, 3, 4
    u, v = torch.randn(out, k * c, generator=g), torch.randn(fan_in, k * c, generator=g)  # k groups side by side
    cores = torch.randn(n, c, c, generator=g)
    group = torch.randint(0, k, (n,), generator=g)
    x, y = torch.randn(rows, fan_in, generator=g), torch.randn(rows, out, generator=g)
    which = torch.randint(-1, n, (rows,), generator=g).sort().values  # -1: a row outside the collection
    expected = y.clone()
    for t in range(rows):
        if which[t] >= 0:
            cols = slice(int(group[which[t]]) * c, int(group[which[t]] + 1) * c)
            expected[t] += x[t] @ (u[:, cols] @ cores[which[t]] @ v[:, cols].t()).t()
    row_cores = cores[which.clamp_min(0)].clone()
    row_cores[which < 0] = float("nan")  # stale pool values must not leak into other rows
    blocks = torch.where(which >= 0, group[which.clamp_min(0)], 0)
    got = add_shared_lora(y.clone(), x, v, u.t().contiguous(), row_cores, blocks, which >= 0)
    runs = [(int(torch.nonzero(which == a).min()), int(torch.nonzero(which == a).max()) + 1, int(group[a]), cores[a])
            for a in range(n) if (which == a).any()]
    by_runs = add_shared_lora_runs(y.clone(), x, v, u.t().contiguous(), runs)
    # fp32: both sides sum c + fan_in products of O(1) terms; error ~ eps32 * (fan_in * c) * |terms|
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(by_runs, expected, rtol=1e-4, atol=1e-3)


@pytest.fixture(scope="module")
def served(tmp_path_factory, lora):
    """Tiny Llama, three PEFT adapters of ranks 2/4/3 on q/v/down, one uncompressed adapter on q/o."""
    root = tmp_path_factory.mktemp("served")
    base = lora.tiny_model("llama")
    paths = {name: root / name for name in [*RANKS, "plain"]}
    for seed, (name, rank) in enumerate(RANKS.items()):
        lora.save_adapter(base, paths[name], rank, TARGETS, seed=seed)
    lora.save_adapter(base, paths["plain"], 5, ["q_proj", "o_proj"], seed=9)
    adapters, _ = read_adapters({n: paths[n] for n in RANKS})
    compress(adapters, "lossless").save(root / "lossless")
    compress(adapters, 3, clusters=[["c0", "c2"], ["c1"]]).save(root / "lossy")
    for prefix in ("x", "y"):
        compress({f"{prefix}-{n}": a for n, a in adapters.items()}, 2).save(root / f"renamed-{prefix}")
    return base, paths, root


def _engine(base, **options) -> Engine:
    return Engine(copy.deepcopy(base), config=EngineConfig(pool_slots=4000, max_batch_tokens=24, **options))


def _jobs(names):
    return [(name, PROMPTS[i % len(PROMPTS)]) for i, name in enumerate(names)]


def _generate(engine, jobs):
    results = engine.generate([p for _, p in jobs], SamplingParams(max_tokens=NEW, temperature=0), [a for a, _ in jobs])
    return [r.token_ids for r in results]


def test_lossless_collection_serves_peft_tokens_in_mixed_batches(served, lora, device):
    # On a GPU (the `device` fixture, tests/conftest.py) uncompressed rows run the Triton LoRA kernels and
    # compressed rows cuBLAS; the oracle stays PEFT on the CPU.
    base, paths, root = served
    engine = _engine(base, device=device)
    infos = engine.add_adapter_collection(root / "lossless")
    assert [i.name for i in infos] == list(RANKS)
    engine.add_adapter("plain", paths["plain"])
    for name in RANKS:
        engine.add_adapter(f"u-{name}", paths[name])  # the same adapters uncompressed, in the same batch
    jobs = _jobs([*RANKS, "plain", None, *(f"u-{n}" for n in RANKS), "c1", "c0"])
    got = _generate(engine, jobs)
    for (adapter, prompt), tokens in zip(jobs, got):
        if adapter is None:
            assert tokens == lora.hf_generate(base, prompt, NEW)
        else:
            assert tokens == lora.peft_generate(base, paths[adapter.removeprefix("u-")], prompt, NEW), adapter
    base_tokens = [lora.hf_generate(base, prompt, NEW) for _, prompt in jobs[:3]]
    assert all(a != b for a, b in zip(got[:3], base_tokens))  # the compressed adapters move the tokens


def _rebuilt_peft(collection: CompressedCollection, name: str, template, path) -> None:
    """PEFT files of adapter ``name`` rebuilt from the collection: ``A = Σ V^T``, ``B = U``, scale 1."""
    group = next(g for g in collection.groups if name in g.names)
    j = group.names.index(name)
    tensors = {}
    for m, (u, v) in group.bases.items():
        tensors[f"base_model.model.{m}.lora_A.weight"] = (group.cores[m][j] @ v.t()).contiguous()
        tensors[f"base_model.model.{m}.lora_B.weight"] = u.contiguous()
    path.mkdir()
    config = json.loads((template / "adapter_config.json").read_text())
    c = next(iter(group.bases.values()))[0].shape[1]
    (path / "adapter_config.json").write_text(json.dumps({**config, "r": c, "lora_alpha": c, "rank_pattern": {}}))
    save_file(tensors, str(path / "adapter_model.safetensors"))


def test_lossy_collection_equals_peft_on_rebuilt_adapters(served, lora, tmp_path):
    base, paths, root = served
    collection = CompressedCollection.load(root / "lossy")
    assert max(e["relative_error"] for e in collection.errors.values()) > 0.05  # c = 3: really lossy
    engine = _engine(base)
    engine.add_adapter_collection(root / "lossy")
    engine.add_adapter("plain", paths["plain"])
    jobs = _jobs([*RANKS, "plain", None, "c2"])
    for (adapter, prompt), tokens in zip(jobs, _generate(engine, jobs)):
        if adapter in RANKS:
            _rebuilt_peft(collection, adapter, paths[adapter], tmp_path / f"{adapter}-{len(prompt)}")
            assert tokens == lora.peft_generate(base, tmp_path / f"{adapter}-{len(prompt)}", prompt, NEW), adapter


def test_bad_collections_leave_the_engine_unchanged(served, lora):
    base, paths, root = served
    wide = Engine(lora.tiny_model("llama", intermediate_size=80), config=EngineConfig(pool_slots=4000))
    with pytest.raises(AdapterError, match="down_proj as .* another base"):
        wide.add_adapter_collection(root / "lossless")
    assert wide.list_adapters() == [] and wide.pool_stats().adapters == 0
    engine = _engine(base)
    engine.add_adapter("c2", paths["c2"])
    before = engine.pool_stats()
    with pytest.raises(AdapterError, match="'c2' is already registered"):
        engine.add_adapter_collection(root / "lossless")
    assert [a.name for a in engine.list_adapters()] == ["c2"] and engine.pool_stats() == before


def test_removing_every_adapter_frees_the_bases(served):
    base, _, root = served
    engine = _engine(base, max_resident_adapters=2)  # 2 collections at most, and evictions of cores
    engine.add_adapter_collection(root / "lossy")
    assert engine.pool_stats().adapters > 0  # the bases
    _generate(engine, _jobs([*RANKS, "c0"]))
    for name in RANKS:
        engine.remove_adapter(name)
    assert engine.pool_stats().adapters == 0 and engine.list_adapters() == []
    assert len(engine.add_adapter_collection(root / "lossy")) == 3  # the collection keys are free again
    engine.add_adapter_collection(root / "renamed-x")
    with pytest.raises(AdapterError, match="2 collections are registered"):
        engine.add_adapter_collection(root / "renamed-y")


def test_cli_serves_every_adapter_of_a_collection(served, tmp_path):
    base, paths, root = served
    base.save_pretrained(tmp_path / "model")
    args = parse_args(["--model", str(tmp_path / "model"), "--adapter-collection", str(root / "lossy"),
                       "--adapter", f"plain={paths['plain']}", "--pool-slots", "4000"])
    engine = build_engine(args)
    assert sorted(a.name for a in engine.list_adapters()) == ["c0", "c1", "c2", "plain"]
    with pytest.raises(SystemExit, match="cannot serve adapter collection"):
        build_engine(parse_args(["--model", str(tmp_path / "model"), "--adapter-collection", str(tmp_path)]))
