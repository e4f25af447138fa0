"""lora_serve.compress: the joint compression against exact oracles, the collection files, bad input.

Oracles: the dense updates ``s·B·A`` rebuilt from the PEFT factors; for one adapter, the Eckart–Young
truncated SVD (the best rank-c approximation, which a shared basis of one adapter must reach); planted
cluster structure that a k-group compression must recover. Fitting runs in float64 and collections
store float32, so a lossless reconstruction is exact up to fp32 rounding: relative error ~ eps32 · √c
(< 1e-5 here with c <= 12).
"""

from __future__ import annotations

import json

import pytest
import torch

from lora_serve.adapter_store import Adapter, LoRAWeights
from lora_serve.collection import CompressedCollection, read_adapters
from lora_serve.compress import Factors, compress, fit_bases, main
from lora_serve.peft_files import AdapterError

SHAPES = {"l0.q": (48, 40), "l0.o": (40, 56), "l1.q": (48, 40)}  # module -> (in, out); odd, unequal sizes


def _adapter(name: str, rank: int, seed: int, subspace=None) -> Adapter:
    """Random factors; with ``subspace`` (module -> (Ub, Va)), B's columns and A's rows lie in those spans."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for m, (fan_in, out) in SHAPES.items():
        a, b = torch.randn(rank, fan_in, generator=g), torch.randn(out, rank, generator=g)
        if subspace is not None:
            ub, va = subspace[m]
            a, b = torch.randn(rank, va.shape[1], generator=g) @ va.t(), ub @ torch.randn(ub.shape[1], rank, generator=g)
        modules[m] = LoRAWeights(a, b, 2.0 / rank)
    return Adapter(name, f"/dirs/{name}", modules)


def _dense(w: LoRAWeights) -> torch.Tensor:
    return w.scale * w.b.double() @ w.a.double()


def _rebuilt(collection: CompressedCollection, name: str, module: str) -> torch.Tensor:
    group = next(g for g in collection.groups if name in g.names)
    u, v = group.bases[module]
    return u.double() @ group.cores[module][group.names.index(name)].double() @ v.double().t()


def _relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_lossless_at_the_sum_of_ranks_rebuilds_every_update():
    adapters = {f"a{i}": _adapter(f"a{i}", r, i) for i, r in enumerate([1, 4, 3, 4])}
    collection = compress(adapters, "lossless")
    for name, adapter in adapters.items():
        for m, w in adapter.modules.items():
            assert _relative(_rebuilt(collection, name, m), _dense(w)) < 1e-5  # fp32 storage, c = 12
    u, v = collection.groups[0].bases["l0.q"]
    assert u.shape == (40, 12) and v.shape == (48, 12)
    assert torch.allclose(u.t() @ u, torch.eye(12), atol=1e-5)  # orthonormal columns


def test_one_adapter_reaches_the_truncated_svd():
    # Eckart–Young: the best rank-c approximation of one update is its truncated SVD; shared bases of a
    # single adapter can do no better and must do no worse.
    adapter = _adapter("a", 8, 0)
    collection = compress({"a": adapter}, 3)
    for m, w in adapter.modules.items():
        s = torch.linalg.svdvals(_dense(w))
        best = float(s[3:].square().sum().sqrt() / s.square().sum().sqrt())
        got = _relative(_rebuilt(collection, "a", m), _dense(w))
        assert got == pytest.approx(best, rel=1e-4, abs=1e-6)
        assert collection.errors["a"]["per_module"][m] == pytest.approx(got, rel=1e-4)


def test_alternation_captures_no_less_than_the_joint_svd_start():
    adapters = [_adapter(f"a{i}", 6, i) for i in range(5)]
    f = Factors.stack([a.modules["l0.o"] for a in adapters])
    captured = [float(f.cores(*fit_bases(f, 5, iterations)).square().sum()) for iterations in (0, 1, 4)]
    assert captured[0] <= captured[1] * (1 + 1e-12) and captured[1] <= captured[2] * (1 + 1e-12)
    assert captured[2] < float(f.energy.sum())  # c = 5 < 30: lossy, so the test can tell


def test_reported_errors_equal_the_rebuilt_updates():
    adapters = {f"a{i}": _adapter(f"a{i}", 4, i) for i in range(4)}
    collection = compress(adapters, 6)
    for name, adapter in adapters.items():
        residual = sum(float((_rebuilt(collection, name, m) - _dense(w)).square().sum()) for m, w in adapter.modules.items())
        energy = sum(float(_dense(w).square().sum()) for w in adapter.modules.values())
        assert collection.errors[name]["relative_error"] == pytest.approx((residual / energy) ** 0.5, rel=1e-4)
        assert collection.errors[name]["relative_error"] > 0.05  # lossy at c = 6 < 16


def test_clusters_find_planted_groups():
    g = torch.Generator().manual_seed(7)
    planted = [{m: (torch.linalg.qr(torch.randn(out, 3, generator=g))[0], torch.linalg.qr(torch.randn(fan_in, 3, generator=g))[0])
                for m, (fan_in, out) in SHAPES.items()} for _ in range(2)]
    adapters = {f"a{i}": _adapter(f"a{i}", 2, i, planted[i % 2]) for i in range(8)}
    clustered = compress(adapters, 3, clusters=2)
    assert sorted(sorted(group.names) for group in clustered.groups) == [["a0", "a2", "a4", "a6"], ["a1", "a3", "a5", "a7"]]
    assert max(e["relative_error"] for e in clustered.errors.values()) < 1e-5  # each group spans 3 dims
    single = compress(adapters, 3, clusters=1)
    assert min(e["relative_error"] for e in single.errors.values()) > 0.1  # one basis of 3 cannot hold both
    given = compress(adapters, 3, clusters=[["a0", "a1"], ["a2", "a3", "a4", "a5", "a6", "a7"]])
    assert [grp.names for grp in given.groups] == [["a0", "a1"], ["a2", "a3", "a4", "a5", "a6", "a7"]]
    with pytest.raises(ValueError, match="each adapter"):
        compress(adapters, 3, clusters=[["a0"], ["a1", "zz"]])


def test_collection_files_round_trip(tmp_path):
    adapters = {f"a{i}": _adapter(f"a{i}", 3, i) for i in range(3)}
    collection = compress(adapters, 4, clusters=[["a2"], ["a0", "a1"]])
    collection.save(tmp_path / "c")
    loaded = CompressedCollection.load(tmp_path / "c")
    assert loaded.names() == ["a2", "a0", "a1"] and loaded.errors == collection.errors
    for m in SHAPES:
        assert torch.equal(loaded.groups[1].cores[m], collection.groups[1].cores[m])
        assert torch.equal(loaded.groups[0].bases[m][0], collection.groups[0].bases[m][0])
    (tmp_path / "c" / "collection.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(AdapterError, match="format is 'other'"):
        CompressedCollection.load(tmp_path / "c")


@pytest.fixture(scope="module")
def peft_dirs(tmp_path_factory, lora):
    """PEFT-saved adapters of the tiny Llama: ranks 2 and 5 on q/v, one on q/k, one of another base."""
    root = tmp_path_factory.mktemp("peft")
    base = lora.tiny_model("llama")
    dirs = {}
    for name, rank, targets in [("r2", 2, ["q_proj", "v_proj"]), ("r5", 5, ["q_proj", "v_proj"]), ("qk", 2, ["q_proj", "k_proj"])]:
        dirs[name] = root / name
        lora.save_adapter(base, dirs[name], rank, targets, seed=rank)
    dirs["wide"] = root / "wide"
    lora.save_adapter(lora.tiny_model("llama", hidden_size=96), dirs["wide"], 2, ["q_proj", "v_proj"], seed=1)
    return dirs


def test_peft_dirs_compress_losslessly_with_mixed_ranks(peft_dirs):
    adapters, _ = read_adapters({k: peft_dirs[k] for k in ("r2", "r5")})
    collection = compress(adapters, "lossless")
    for name, adapter in adapters.items():
        for m, w in adapter.modules.items():
            assert _relative(_rebuilt(collection, name, m), _dense(w)) < 1e-5


def test_bad_sets_are_refused_with_the_reason(peft_dirs, tmp_path):
    with pytest.raises(AdapterError, match="'qk' and 'r2' differ at .*k_proj: 64 -> 32 vs not adapted"):
        read_adapters({k: peft_dirs[k] for k in ("r2", "qk")})
    with pytest.raises(AdapterError, match="'wide' and 'r2' differ at .*q_proj: 96 -> 96 vs 64 -> 64"):
        read_adapters({k: peft_dirs[k] for k in ("r2", "wide")})
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((peft_dirs["r2"] / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "some/other-model"}))
    (other / "adapter_model.safetensors").write_bytes((peft_dirs["r2"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterError, match="'other' was trained on base model 'some/other-model'"):
        read_adapters({"r2": peft_dirs["r2"], "other": other})
    (other / "adapter_config.json").write_text(json.dumps({**config, "target_parameters": ["mlp.experts.down_proj"]}))
    with pytest.raises(AdapterError, match="LoRA on parameters"):
        read_adapters({"other": other})


def test_command_line_writes_a_collection(peft_dirs, tmp_path, capsys):
    main([str(tmp_path / "out"), f"x={peft_dirs['r2']}", str(peft_dirs["r5"]), "--rank", "3"])
    collection = CompressedCollection.load(tmp_path / "out")
    assert collection.names() == ["x", "r5"] and collection.groups[0].bases["model.layers.0.self_attn.q_proj"][0].shape[1] == 3
    assert "2 adapters -> 1 group(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="differ at"):
        main([str(tmp_path / "bad"), str(peft_dirs["r2"]), str(peft_dirs["qk"]), "--rank", "3"])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "twice"), str(peft_dirs["r2"]), f"r2={peft_dirs['r5']}", "--rank", "3"])
    assert "'r2' is given twice" in capsys.readouterr().err
