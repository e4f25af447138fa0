"""Every number RESULTS.md quotes from a recorded run is in that run's JSON.

Oracle: the JSON files under benchmarks/results/ (what the scripts wrote). The markdown tables are parsed
(cells -> numbers, not prose) and each number is compared with the JSON value rounded to the precision the
table shows: |shown - recorded| <= half a unit of the last shown digit. Tables that were typed from a run
whose JSON was not kept are listed in NOT_IN_JSON with the reason, so a new table must either be checked
here (or in test_claims_moe.py) or be named there. Also: every benchmarks/results path RESULTS.md or benchmarks/README.md names exists.
"""

from __future__ import annotations

import glob
import json
import re

import pytest

from tests.claims import (CHECKED, NOT_IN_JSON, RESULTS, RESULTS_MD, ROOT, _check, _json, _matches, _numbers,
                          _table, _tables)


def test_results_paths_exist():
    texts = RESULTS_MD.read_text() + (ROOT / "benchmarks" / "README.md").read_text()
    paths = set(re.findall(r"benchmarks/results/[\w./*-]+", texts))
    assert paths
    for path in paths:
        path = path.rstrip(".")
        assert glob.glob(str(ROOT / path)), f"{path} is cited but does not exist"


# --- FP8 optimizer (P3): fp8_memory.json -----------------------------------------------------------

_FP8_KEYS = {"torch AdamW (default: for-loop on CPU)": "torch AdamW (foreach)"}  # recorded under its old label


def test_fp8_optimizer_table():
    data = _json("fp8_memory.json")
    _, header, rows = _table("FP8 optimizer states", "optimizer")
    models = header[1:]
    base = _FP8_KEYS["torch AdamW (default: for-loop on CPU)"]
    for row in rows:
        key = _FP8_KEYS.get(row[0], row[0])
        for model, cell in zip(models, row[1:]):
            recorded = data["optimizer"][model][key]
            bytes_, ms, ratio = _numbers(cell)
            _check(f"{row[0]} {model} B/param", bytes_, recorded["bytes_per_param"])
            _check(f"{row[0]} {model} ms", ms, recorded["step_ms"])
            _check(f"{row[0]} {model} ratio", ratio, recorded["step_ms"] / data["optimizer"][model][base]["step_ms"])
    parity = _table("FP8 optimizer states", "optimizer", 1)[2]
    for name, loss, _ in parity:
        _check(f"parity {name}", loss, data["parity"][_FP8_KEYS.get(name, name)])


def test_fp8_activation_table():
    data = _json("fp8_memory.json")["activations"]
    for name, per_layer, ratio, sqnr in _table("FP8 optimizer states", "activations")[2]:
        recorded = data[name]["per_layer_bytes"]
        for shown, value in zip(_numbers(per_layer), recorded):
            _check(f"{name} MiB", shown, value / 2**20)
        _check(f"{name} vs fp32", _numbers(ratio)[0], sum(recorded) / sum(data["fp32"]["per_layer_bytes"]))
        if name != "fp32":
            _check(f"{name} SQNR", _numbers(sqnr)[0], data[name]["worst_grad_sqnr_db"])


def test_fp8_offload_tables():
    data = _json("fp8_offload_step_1thread.json")["optimizer"]
    _, header, rows = _table("FP8AdamW as the ZeRO-Offload optimizer", "optimizer")
    for row in rows:
        for model, cell in zip(header[1:], row[1:]):
            recorded = data[model][row[0]]
            bytes_, ms, ratio = _numbers(cell)
            _check(f"{row[0]} {model} B/param", bytes_, recorded["bytes_per_param"])
            _check(f"{row[0]} {model} ms", ms, recorded["step_ms"])
            _check(f"{row[0]} {model} ratio", ratio, recorded["step_ms"] / data[model]["DeepSpeedCPUAdam"]["step_ms"])
    runs = _json("fp8_offload_training.json")["results"]
    names = {"DeepSpeedCPUAdam": "DeepSpeedCPUAdam", "moeplug FP8AdamW": "FP8AdamW", "torch AdamW (fp32)": "torch AdamW"}
    final = {name: sum(run["losses"][-10:]) / 10 for name, run in runs.items()}
    for name, state, rss, loss, step in _table("FP8AdamW as the ZeRO-Offload optimizer", "optimizer", 1)[2]:
        run = runs[names[name]]
        mib, per_param = _numbers(state)
        _check(f"{name} state MiB", mib, run["optimizer_state_bytes"], 2**-20)
        _check(f"{name} B/param", per_param, run["optimizer_state_bytes"] / run["params"])
        _check(f"{name} peak RSS", _numbers(rss)[0], run["peak_rss_mib"])
        shown_loss, *change = _numbers(loss)
        _check(f"{name} final loss", shown_loss, final[names[name]])
        for shown in change:
            _check(f"{name} vs DeepSpeedCPUAdam", shown, final[names[name]] / final["DeepSpeedCPUAdam"] - 1, 100)
        _check(f"{name} step", _numbers(step)[0], run["median_engine_step_ms"])


# --- Kernels on the H200: kernel_gpu_h200*.json -------------------------------------------------------


@pytest.mark.parametrize("occurrence, name", [(0, "kernel_gpu_h200.json"), (1, "kernel_gpu_h200_lora_segments_reused.json")])
def test_h200_kernel_tables(occurrence, name):
    rows = {(r["op"], r["shape"], r["dtype"], impl): (r, v) for r in _json(name)["rows"] for impl, v in r["impls"].items()}
    table = _table("Kernels on a GPU", "op", occurrence)[2]
    assert table
    for op, shape, dtype, impl, ms, tflops, gbps, roof, vs, check in table:
        row, recorded = rows[(op, shape, dtype, impl)]
        _check(f"{op} {shape} {impl} ms", ms, recorded["ms"])
        _check(f"{op} {shape} {impl} roof %", roof, recorded["roof_pct"])
        ours = next(iter(row["impls"].values()))["ms"]  # the first implementation is ours
        _check(f"{op} {shape} {impl} vs ours", vs, recorded["ms"] / ours)
        if check:
            assert check == row["check"], (op, shape, check, row["check"])


# --- P2 serving: lora_serving_*.json --------------------------------------------------------------------


@pytest.mark.parametrize("context, name", [
    ("SmolLM2-135M-Instruct, N=100, machine idle", "lora_serving_smollm2_engine.json"),
    ("SmolLM2-135M, N=100, all systems", "lora_serving_smollm2.json"),
    ("Tiny Llama (h256, 4 layers, vocab 4096), N=10 and 100", "lora_serving_tiny.json"),
    ("Tiny Llama, 1000 adapters vs 10", "lora_serving_tiny1000.json"),
])
def test_serving_tables(context, name):
    results = {r["adapters"]: r for r in _json(name)["results"]}
    _, header, rows = _table(context, "N")
    systems = ("hf-plain", "peft-mixed", "peft-single", "engine-lora", "engine-base")
    for row in rows:
        result = results[int(row[0])]
        speed = {s: v["tokens_per_s"] for s, v in result["systems"].items()}
        assert int(row[1]) == result["distinct_in_batch"]
        for column, cell in zip(header[2:], row[2:]):
            if column in systems:
                _check(f"{name} N={row[0]} {column}", cell, speed[column])
            elif column == "engine lora/base":
                _check(f"{name} N={row[0]} lora/base", _numbers(cell)[0], speed["engine-lora"] / speed["engine-base"])
            elif column == "engine-lora vs peft-mixed":
                _check(f"{name} N={row[0]} vs peft-mixed", _numbers(cell)[0], speed["engine-lora"] / speed["peft-mixed"])
            elif column == "vs peft-single":
                _check(f"{name} N={row[0]} vs peft-single", _numbers(cell)[0], speed["engine-lora"] / speed["peft-single"])
            elif column == "engine-base vs hf-plain":
                _check(f"{name} N={row[0]} base vs hf", _numbers(cell)[0], speed["engine-base"] / speed["hf-plain"])


def test_the_parser_catches_a_wrong_number():
    """The checks above can fail: one digit off is caught, rounding to the shown precision is not."""
    assert _matches("1,234", 1234.4) and not _matches("1,234", 1234.6)
    assert _matches("0.82", 0.8183) and not _matches("0.82", 0.8149)
    assert _matches("-20.0", -0.19996, 100) and not _matches("-20.0", -0.2006, 100)
    assert _numbers("2.4-2.9x, -20.0%, 13,213") == ["2.4", "2.9", "-20.0", "13,213"]


# --- kernels on CPU and ahead-of-time GPU resources: kernel_ops.json -----------------------------------


def test_kernel_ops_tables():
    data = _json("kernel_ops.json")
    static = {(k["name"], k["arch"]): k for k in data["gpu_static"]["kernels"]}
    for occurrence in (0, 1):
        for name, arch, warps, stages, regs, spills, smem, wgmma, gflop, mb, bound in _table(
                "Kernels: grouped GEMM", "kernel / config", occurrence)[2]:
            k = static[(name, arch)]
            assert (int(warps), int(stages), int(regs)) == (k["num_warps"], k["num_stages"], k["registers"]), name
            assert int(spills) == k["spill_store_bytes"] + k["spill_load_bytes"], name
            _check(f"{name} {arch} smem", smem, k["shared_bytes"], 1 / 1024)
            assert (wgmma == "yes") == k["wgmma"], name
            _check(f"{name} GFLOP", gflop, k["flops"], 1e-9)
            _check(f"{name} MB", mb, k["bytes"], 1e-6)
            _check(f"{name} bound", _numbers(bound)[0], k["h100_bound_us"])
    grouped = {r["shape"]: r for r in data["cpu_grouped_mm"]}
    lora = {r["shape"]: r for r in data["cpu_lora"]}
    for case, speedup, floor in _table("Kernels: grouped GEMM", "case")[2]:
        if case.startswith("grouped_mm"):
            shape, _, passes = case.removeprefix("grouped_mm ").rpartition(" ")
            ratios = grouped[shape]["grouped_mm_speedup_vs"]
            _check(f"{case} vs loop", _numbers(speedup)[0], ratios[f"python loop over experts {passes}"])
            _check(f"{case} floor", floor, 1 / ratios[f"torch._grouped_mm, pre-gathered (floor) {passes}"])
        else:
            _check(f"{case}", _numbers(speedup)[0], lora[case.removeprefix("LoRA ")]["speedup_vs_padded_bmm"])


# --- HTTP serving (issue 4): serve_http.json holds the table it printed ----------------------------------


def test_serve_http_table():
    recorded = _tables(_json("serve_http.json")["table"])[0][2]
    assert _table("Issue 4: lora_serve HTTP server", "rate (req/s)")[2] == recorded


# --- compressed adapter collections (issue 22): adapter_compression_tiny.json ---------------------------


def test_adapter_compression_tables():
    result = _json("adapter_compression_tiny.json")["result"]
    speed = {name: r["tokens_per_s"] for name, r in result["throughput"].items()}
    for n, distinct, plain, packed, vs, vs_10, memory, seconds, errors in _table(
            "Issue 22: compressed adapter collections", "N")[2]:
        compression = result["compression"][n]
        assert int(distinct) == result["throughput"][f"compressed-{n}"]["distinct_in_batch"], n
        _check(f"N={n} uncompressed", plain, speed[f"uncompressed-{n}"])
        _check(f"N={n} compressed", packed, speed[f"compressed-{n}"])
        _check(f"N={n} ratio", _numbers(vs)[0], speed[f"compressed-{n}"] / speed[f"uncompressed-{n}"])
        _check(f"N={n} vs 10", _numbers(vs_10)[0], speed[f"compressed-{n}"] / speed["uncompressed-10"])
        shown_plain, shown_packed = _numbers(memory)
        _check(f"N={n} KiB", shown_plain, compression["memory"]["uncompressed_bytes"], 1 / 1024)
        _check(f"N={n} KiB compressed", shown_packed, compression["memory"]["compressed_bytes"], 1 / 1024)
        _check(f"N={n} seconds", _numbers(seconds)[0], compression["compress_s"])
        mean, worst = _numbers(errors)
        _check(f"N={n} error", mean, compression["relative_error_mean"])
        _check(f"N={n} worst error", worst, compression["relative_error_max"])
    for key, mean, worst, within, at_most, seconds in _table(
            "Issue 22: compressed adapter collections", "clusters x rank")[2]:
        sweep = result["quality"]["sweep"][key]
        _check(f"{key} mean", _numbers(mean)[0], sweep["relative_change_mean"], 100)
        _check(f"{key} worst", _numbers(worst)[0], sweep["relative_change_max"], 100)
        _check(f"{key} within", _numbers(within)[0], sweep["within_2_percent"], 100)
        _check(f"{key} at most", _numbers(at_most)[0], sweep["at_most_2_percent_worse"], 100)
        _check(f"{key} seconds", _numbers(seconds)[0], sweep["compress_s"])


def test_every_table_is_checked_or_explained():
    """Every table of RESULTS.md is read by a test here or listed in NOT_IN_JSON with the reason, so a table
    added without a JSON behind it fails."""
    tables = _tables(RESULTS_MD.read_text())
    covered = set()
    for part, header, occurrence in CHECKED | set(NOT_IN_JSON):
        matching = [i for i, (context, head, _) in enumerate(tables) if part in context and head[0] == header]
        assert len(matching) > occurrence, (part, header, occurrence)
        covered.add(matching[occurrence])
    missing = [(tables[i][0][:70], tables[i][1][0]) for i in range(len(tables)) if i not in covered]
    assert not missing, f"tables neither checked against a JSON nor explained in NOT_IN_JSON: {missing}"


# --- benchmarks/README.md: the figures the top-level README quotes --------------------------------------


def _smollm2(name: str) -> dict[str, float]:
    return {s: v["tokens_per_s"] for s, v in _json(name)["results"][0]["systems"].items()}


def _h200(op: str, shape_prefix: str) -> dict:
    return next(r for r in _json("kernel_gpu_h200.json")["rows"] if r["op"] == op and r["shape"].startswith(shape_prefix))


def _fp8_ratios(baseline: str) -> list[float]:
    optimizer = _json("fp8_offload_step_1thread.json")["optimizer"]
    return [v["moeplug FP8AdamW"]["step_ms"] / v[baseline]["step_ms"] for v in optimizer.values()]


def _placement(key: str) -> float:
    return _json("placement.json")["measured"][key]["cross_rank_rows_per_step"]


# README figure (first cell of its row in benchmarks/README.md) -> numbers recomputed from the JSON, in the
# order the row's "value" cell shows them.
README_FIGURES = {
    "FP8AdamW state size": lambda: [min(v["moeplug FP8AdamW"]["bytes_per_param"]
                                        for v in _json("fp8_memory.json")["optimizer"].values())],
    "FP8AdamW step vs torch's default AdamW, then vs `AdamW(fused=True)` (1.6M / 50M parameters)": lambda: [
        *_fp8_ratios("torch AdamW (default)"), *_fp8_ratios("torch AdamW (fused)")],
    "FP8AdamW step vs DeepSpeedCPUAdam (ZeRO-Offload)": lambda: [min(_fp8_ratios("DeepSpeedCPUAdam")),
                                                                max(_fp8_ratios("DeepSpeedCPUAdam"))],
    "compressed activations, default selection": lambda: [
        sum(_json("fp8_memory.json")["activations"]["FP8, default selection"]["per_layer_bytes"])
        / sum(_json("fp8_memory.json")["activations"]["fp32"]["per_layer_bytes"]),
        _json("fp8_memory.json")["activations"]["FP8, default selection"]["worst_grad_sqnr_db"]],
    "P2 engine base vs HF `generate`": lambda: [(s := _smollm2("lora_serving_smollm2.json"))["engine-base"] / s["hf-plain"]],
    "P2 mixed adapters vs the engine's base": lambda: [(s := _smollm2("lora_serving_smollm2.json"))["engine-lora"]
                                                       / s["engine-base"]],
    "P2 mixed adapters vs PEFT mixed batches": lambda: [(s := _smollm2("lora_serving_smollm2.json"))["engine-lora"]
                                                        / s["peft-mixed"]],
    "P2 mixed adapters vs PEFT one adapter at a time": lambda: [(s := _smollm2("lora_serving_smollm2.json"))["engine-lora"]
                                                                / s["peft-single"]],
    "P2 on an idle machine, without PEFT: base vs HF, adapters vs base": lambda: [
        (s := _smollm2("lora_serving_smollm2_engine.json"))["engine-base"] / s["hf-plain"], s["engine-lora"] / s["engine-base"]],
    "P5 ILP: fewer standard-dispatch rows than contiguous (measured)": lambda: [
        100 * (1 - _placement("ilp_standard/dedup") / _placement("contiguous/dedup"))],
    "P5 max/mean load with 8 replicas": lambda: [_json("placement.json")["placements"]["greedy_replicas8"]["max_mean_load"]],
    "grouped GEMM forward at Mixtral-8x7B w1 size, bf16": lambda: [
        _h200("grouped_mm fwd", "Mixtral w1")["impls"]["triton grouped_mm (gather, gates, scatter)"]["roof_pct"]],
    "grouped GEMM forward + backward vs `torch._grouped_mm`": lambda: [
        (r := _h200("grouped_mm fwd+bwd", "Mixtral w1")["impls"])["torch._grouped_mm, pre-gathered (floor)"]["ms"]
        / r["triton grouped_mm (gather, gates, scatter)"]["ms"]],
}
NOT_IN_JSON_README = {"compressed activations, `with_attention`"}


def test_benchmarks_readme_figures_match_their_json():
    _, header, rows = next(t for t in _tables((ROOT / "benchmarks" / "README.md").read_text())
                           if t[1][0] == "README figure")
    assert header[:3] == ["README figure", "value", "JSON (key)"]
    assert {row[0] for row in rows} == set(README_FIGURES) | NOT_IN_JSON_README
    for row in rows:
        if row[0] in NOT_IN_JSON_README:
            assert "not in a JSON" in row[2]
            continue
        shown = _numbers(row[1])
        recorded = README_FIGURES[row[0]]()
        assert len(shown) == len(recorded), (row[0], shown, recorded)
        for number, value in zip(shown, recorded):
            _check(f"benchmarks/README.md {row[0]}", number, value)
