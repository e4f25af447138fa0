"""Every number RESULTS.md quotes from a recorded run is in that run's JSON.

Oracle: the JSON files under benchmarks/results/ (what the scripts wrote). The markdown tables are parsed
(cells -> numbers, not prose) and each number is compared with the JSON value rounded to the precision the
table shows: |shown - recorded| <= half a unit of the last shown digit. Tables that were typed from a run
whose JSON was not kept are listed in NOT_IN_JSON with the reason, so a new table must either be checked
here or be named there. Also: every benchmarks/results path RESULTS.md or benchmarks/README.md names exists.
"""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
RESULTS = ROOT / "benchmarks" / "results"
NUMBER = re.compile(r"(?:(?<![\w.])-)?\d[\d,]*(?:\.\d+)?")  # "2.4-2.9" is 2.4 and 2.9; "-20.0%" is negative
# (part of the section heading / bold line, first header cell, occurrence): the tables the tests below read.
CHECKED = {
    ("Kernels: grouped GEMM", "kernel / config", 0), ("Kernels: grouped GEMM", "kernel / config", 1),
    ("Kernels: grouped GEMM", "case", 0), ("Kernels on a GPU", "op", 0), ("Kernels on a GPU", "op", 1),
    ("FP8 optimizer states", "optimizer", 0), ("FP8 optimizer states", "optimizer", 1),
    ("FP8 optimizer states", "activations", 0),
    ("SmolLM2-135M-Instruct, N=100, machine idle", "N", 0), ("SmolLM2-135M, N=100, all systems", "N", 0),
    ("Tiny Llama (h256, 4 layers, vocab 4096), N=10 and 100", "N", 0), ("Tiny Llama, 1000 adapters vs 10", "N", 0),
    ("Issue 4: lora_serve HTTP server", "rate (req/s)", 0), ("P5: expert placement", "placement", 0),
    ("P5: expert placement", "placement", 1), ("P5: expert placement", "placement", 2),
    ("P6: micro-batch vs global-batch", "balance", 0),
    ("P1: moeplug-patched MoE block", "shape", 1), ("Issue 3: expert parallelism", "ranks", 0),
    ("Issue 3: expert parallelism", "ranks", 1), ("P1 at small sizes", "shape", 0),
    ("Conformance: transformers' own model tests", "family", 0),
    ("LoRA on MoE experts: a PEFT training step", "shape", 0),
    ("Serving LoRA on MoE experts", "model", 0),
}
# Tables typed from runs whose JSON was not kept (a later run of the same script overwrote it), with where
# their numbers live instead. A new table must be checked by a test below or listed here.
NOT_IN_JSON = {
    ("Kernels: grouped GEMM", "grouped_mm shape (tokens 2048/1024, top-k, E, K, N)", 0):
        "first kernel_ops.py run; kernel_ops.json holds the second run (its ratios are checked)",
    ("Kernels: grouped GEMM", "LoRA batch (hidden 1024, slot = hidden, ranks 8/16/32/64 mixed, 1/(A+1) rows base-model)", 0):
        "first kernel_ops.py run, as above",
    ("FP8 optimizer states", "activations", 1):
        "the with_attention row, measured after the run with the same code; not in fp8_memory.json",
    ("P1: moeplug-patched MoE block", "shape", 0): "first moe_layer.py run; moe_layer.json holds the second",
}


def _tables(text: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """(the section heading and the last bold line before it, header cells, body rows) for every table."""
    found, heading, bold, lines = [], "", "", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("## "):
            heading, bold = line, ""
        elif line.startswith("**"):
            bold = line
        context = f"{heading} / {bold}"
        if line.startswith("|") and i + 1 < len(lines) and set(lines[i + 1].strip()) <= set("|-: "):
            header = [c.strip() for c in line.strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            found.append((context, header, rows))
            continue
        i += 1
    return found


def _numbers(cell: str) -> list[str]:
    return NUMBER.findall(cell.replace("**", ""))


def _matches(shown: str, recorded: float, scale: float = 1.0) -> bool:
    """`shown` (as printed, maybe with thousands commas) equals `recorded * scale` to its printed precision."""
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    return abs(float(shown.replace(",", "")) - recorded * scale) <= 0.5 * 10**-decimals * (1 + 1e-9) + 1e-12


def _json(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _table(context_part: str, first_header: str, occurrence: int = 0):
    tables = [t for t in _tables(RESULTS_MD.read_text()) if context_part in t[0] and t[1][0] == first_header]
    assert len(tables) > occurrence, f"no table under {context_part!r} starting with {first_header!r}"
    assert tables[occurrence][2], f"the table under {context_part!r} has no rows"
    assert (context_part, first_header, occurrence) in CHECKED
    return tables[occurrence]


def _check(row_name: str, shown: str, recorded: float, scale: float = 1.0) -> None:
    assert _matches(shown, recorded, scale), f"{row_name}: RESULTS.md shows {shown}, the JSON has {recorded * scale}"


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


# --- P5 placement: placement.json ----------------------------------------------------------------------

_P5_NAMES = {"contiguous": "contiguous", "random": "random", "greedy, coherent affinity": "greedy_coherent",
             "greedy, standard affinity": "greedy_standard", "greedy, coherent, tolerance 0.1": "greedy_coherent_tol0.1",
             "greedy + 8 replicas (coherent)": "greedy_replicas8", "ILP, coherent": "ilp_coherent",
             "ILP, standard": "ilp_standard", "greedy, coherent": "greedy_coherent", "greedy + 8 replicas": "greedy_replicas8"}


@pytest.mark.parametrize("occurrence, json_name", [(0, "placement_from_traces.json"), (1, "placement.json")])
def test_placement_plan_tables(occurrence, json_name):
    data = _json(json_name)
    for name, sends, vs, hops, vs_hops, load in _table("P5: expert placement", "placement", occurrence)[2]:
        recorded = data["placements"][_P5_NAMES[name]]
        _check(f"P5 {name} std sends", _numbers(sends)[0], recorded["standard_sends"])
        _check(f"P5 {name} vs contiguous", _numbers(vs)[0], recorded["standard_vs_contiguous"], 100)
        _check(f"P5 {name} coh hops", _numbers(hops)[0], recorded["coherent_hops"])
        _check(f"P5 {name} coh vs contiguous", _numbers(vs_hops)[0], recorded["coherent_vs_contiguous"], 100)
        worst, mean = _numbers(load)
        _check(f"P5 {name} max/mean", worst, recorded["max_mean_load"])
        _check(f"P5 {name} max/mean layer mean", mean, recorded["max_mean_load_mean"])


def test_placement_measured_table():
    data = _json("placement.json")
    for name, dedup, per_choice, _, step_dedup, step_per_choice in _table("P5: expert placement", "placement", 2)[2]:
        key = _P5_NAMES[name]
        for shown, dispatch in ((dedup, "dedup"), (per_choice, "per_choice")):
            _check(f"P5 measured {name} {dispatch}", _numbers(shown)[0],
                   data["measured"][f"{key}/{dispatch}"]["cross_rank_rows_per_step"])
        _check(f"P5 measured {name} step", step_dedup, data["measured"][f"{key}/dedup"]["step_s"])
        _check(f"P5 measured {name} step", step_per_choice, data["measured"][f"{key}/per_choice"]["step_s"])


# --- P1 MoE block: moe_layer.json (the second run; the first table's JSON was overwritten) --------------


def test_moe_layer_table():
    results = {r["shape"].lower(): r for r in _json("moe_layer.json")["results"]}
    _, header, rows = _table("P1: moeplug-patched MoE block", "shape", 1)
    for shape, eager, grouped, ours, roof, vs_grouped, vs_eager, fraction in rows:
        recorded = results[shape.split(",")[0].lower()]
        seconds = recorded["seconds_per_step"]
        for shown, key in ((eager, "eager"), (grouped, "grouped_mm"), (ours, "moeplug"), (roof, "dense roof")):
            _check(f"P1 {shape} {key}", _numbers(shown)[0], seconds[key], 1000)
        _check(f"P1 {shape} vs grouped_mm", _numbers(vs_grouped)[0], recorded["moeplug_speedup_vs"]["grouped_mm"])
        _check(f"P1 {shape} vs eager", _numbers(vs_eager)[0], recorded["moeplug_speedup_vs"]["eager"])
        _check(f"P1 {shape} roof", _numbers(fraction)[0], recorded["fraction_of_roof"], 100)


def test_moe_layer_small_table():
    results = {r["shape"]: r for r in _json("moe_layer_small.json")["results"]}
    for shape, eager, grouped, ours, grouped_c, ours_c, vs_grouped, vs_compiled in _table("P1 at small sizes", "shape")[2]:
        recorded = results[shape]
        seconds = recorded["seconds_per_step"]
        for shown, key in ((eager, "eager"), (grouped, "grouped_mm"), (ours, "moeplug"),
                           (grouped_c, "grouped_mm compiled"), (ours_c, "moeplug compiled")):
            _check(f"P1 small {shape} {key}", _numbers(shown)[0], seconds[key], 1000)
        _check(f"P1 small {shape} vs grouped_mm", _numbers(vs_grouped)[0], recorded["moeplug_speedup_vs"]["grouped_mm"])
        _check(f"P1 small {shape} compiled", _numbers(vs_compiled)[0],
               recorded["compiled_moeplug_speedup_vs_compiled_grouped_mm"])


def test_expert_lora_training_table():
    results = _json("expert_lora_training.json")["results"]
    for shape, theirs, ours, faster, theirs_mem, ours_mem, less in _table("LoRA on MoE experts: a PEFT training step",
                                                                        "shape")[2]:
        recorded = results[shape]
        for shown, key in ((theirs, "transformers + PEFT"), (ours, "moeplug + PEFT")):
            _check(f"expert LoRA {shape} {key}", _numbers(shown)[0], recorded["seconds"][key], 1000)
        for shown, key in ((theirs_mem, "transformers + PEFT"), (ours_mem, "moeplug + PEFT")):
            _check(f"expert LoRA {shape} {key} memory", _numbers(shown)[0], recorded["extra_memory_bytes"][key], 2**-20)
        _check(f"expert LoRA {shape} speed-up", _numbers(faster)[0], recorded["moeplug_peft_speedup"])
        _check(f"expert LoRA {shape} memory saving", _numbers(less)[0], recorded["moeplug_peft_memory_saving"])


def test_expert_lora_serving_table():
    results = {(r["family"], r["adapters"]): r for r in _json("expert_lora_serving.json")["results"]}
    systems = ("hf-plain", "peft-single", "engine-lora", "engine-base")
    for model, n, distinct, *cells in _table("Serving LoRA on MoE experts", "model")[2]:
        recorded = results[(model, int(n))]
        assert int(distinct) == recorded["distinct_in_batch"]
        for shown, system in zip(cells, systems):
            _check(f"expert serving {model} {n} {system}", shown, recorded["systems"][system]["tokens_per_s"])
        ratio, roof = _numbers(cells[4])
        _check(f"expert serving {model} {n} lora/base", ratio, recorded["ratios"]["engine_lora_over_engine_base"])
        _check(f"expert serving {model} {n} roof", roof, recorded["decode_roofline_lora_over_base"])
        _check(f"expert serving {model} {n} vs peft", _numbers(cells[5])[0],
               recorded["ratios"]["engine_lora_over_peft_single"])
        _check(f"expert serving {model} {n} base vs hf", _numbers(cells[6])[0],
               recorded["ratios"]["engine_base_over_hf_plain"])


def test_conformance_table():
    families = _json("conformance.json")["families"]
    for family, *cells in _table("Conformance: transformers' own model tests", "family")[2]:
        recorded = families[family]
        expected = (recorded["eager"]["counts"]["passed"], recorded["eager"]["counts"]["failed"],
                    recorded["patched"]["counts"]["passed"], recorded["patched"]["counts"]["failed"],
                    len(recorded["regressions"]))
        assert tuple(int(c) for c in cells) == expected, f"conformance {family}: {cells} vs {expected}"


# --- P6 balancing: global_balance/result-*.json ---------------------------------------------------------


def test_global_balance_table():
    for balance, english, python, js, mean_js, load in _table("P6: micro-batch vs global-batch", "balance")[2]:
        result = _json(f"global_balance/result-{balance}.json")["result"]
        _check(f"P6 {balance} english", _numbers(english)[0], result["loss"]["english"])
        _check(f"P6 {balance} python", _numbers(python)[0], result["loss"]["python"])
        for shown, value in zip(_numbers(js), result["js_bits_per_layer"], strict=True):
            _check(f"P6 {balance} JS", shown, value)
        _check(f"P6 {balance} mean JS", _numbers(mean_js)[0], sum(result["js_bits_per_layer"]) / 4)
        for shown, value in zip(_numbers(load), result["max_over_mean_per_layer"], strict=True):
            _check(f"P6 {balance} max/mean", shown, value)


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


# --- Expert parallelism (issue 3): expert_parallel*.json ---------------------------------------------------


@pytest.mark.parametrize("occurrence, name", [(0, "expert_parallel.json"), (1, "expert_parallel_skewed.json")])
def test_expert_parallel_tables(occurrence, name):
    results = {r["ranks"]: r["medians_s"] for r in _json(name)["results"]}
    for ranks, phase, ours, theirs, ratio in _table("Issue 3: expert parallelism", "ranks", occurrence)[2]:
        medians = results[int(ranks)]
        _check(f"{name} {ranks} {phase} moeplug", ours, medians["moeplug"][phase], 1000)
        _check(f"{name} {ranks} {phase} deepspeed", theirs, medians["deepspeed"][phase], 1000)
        _check(f"{name} {ranks} {phase} ratio", _numbers(ratio)[0], medians["deepspeed"][phase] / medians["moeplug"][phase])


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


def _fp8_ratios() -> list[float]:
    optimizer = _json("fp8_memory.json")["optimizer"]
    return [v["moeplug FP8AdamW"]["step_ms"] / v["torch AdamW (foreach)"]["step_ms"] for v in optimizer.values()]


def _placement(key: str) -> float:
    return _json("placement.json")["measured"][key]["cross_rank_rows_per_step"]


# README figure (first cell of its row in benchmarks/README.md) -> numbers recomputed from the JSON, in the
# order the row's "value" cell shows them.
README_FIGURES = {
    "FP8AdamW state size": lambda: [min(v["moeplug FP8AdamW"]["bytes_per_param"]
                                        for v in _json("fp8_memory.json")["optimizer"].values())],
    "FP8AdamW step vs torch's default AdamW": lambda: [min(_fp8_ratios()), max(_fp8_ratios())],
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
