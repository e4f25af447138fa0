"""RESULTS.md's moeplug tables (P1, P5, P6, expert LoRA, expert parallelism, conformance) against their JSON.

The registry of checked tables and the parser are in test_claims.py and tests/claims.py.
"""

from __future__ import annotations

import json

import pytest

from tests.claims import RESULTS, _check, _json, _numbers, _table


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


# --- Expert parallelism (issue 3): expert_parallel*.json ---------------------------------------------------


@pytest.mark.parametrize("occurrence, name", [(0, "expert_parallel.json"), (1, "expert_parallel_skewed.json")])
def test_expert_parallel_tables(occurrence, name):
    results = {r["ranks"]: r["medians_s"] for r in _json(name)["results"]}
    for ranks, phase, ours, theirs, ratio in _table("Issue 3: expert parallelism", "ranks", occurrence)[2]:
        medians = results[int(ranks)]
        _check(f"{name} {ranks} {phase} moeplug", ours, medians["moeplug"][phase], 1000)
        _check(f"{name} {ranks} {phase} deepspeed", theirs, medians["deepspeed"][phase], 1000)
        _check(f"{name} {ranks} {phase} ratio", _numbers(ratio)[0], medians["deepspeed"][phase] / medians["moeplug"][phase])


# --- Issue 23 across hosts: multihost.json (1 Gbit/s) and multihost_100mbit.json ------------------------

_HOST_ROWS = {"contiguous, flat": "contiguous/flat", "contiguous, hierarchical": "contiguous/hierarchical",
              "node-aware ILP, flat": "node_aware/flat", "node-aware ILP, hierarchical": "node_aware/hierarchical",
              "node-aware ILP + 4 replicas, flat": "node_aware_r4/flat",
              "node-aware ILP + 4 replicas, hierarchical": "node_aware_r4/hierarchical"}


@pytest.mark.parametrize("header, layout", [("2 hosts x 2 ranks", "2x2"), ("4 hosts x 1 rank", "4x1")])
def test_multihost_tables(header, layout):
    measured = _json("multihost.json")["layouts"][layout]["measured"]
    slow_link = _json("multihost_100mbit.json")["layouts"][layout]["measured"] if layout == "2x2" else {}
    for name, megabytes, vs, rows, load, step, *step_100mbit in _table("Issue 23: expert parallelism across hosts",
                                                                       header)[2]:
        recorded = measured[_HOST_ROWS[name]]
        _check(f"{layout} {name} MB", megabytes, recorded["link_bytes_per_step"], 1e-6)
        _check(f"{layout} {name} vs flat", _numbers(vs)[0], recorded["bytes_vs_flat_contiguous"])
        shown_rows, predicted = _numbers(rows)
        _check(f"{layout} {name} rows", shown_rows, recorded["inter_host_rows"])
        _check(f"{layout} {name} predicted rows", predicted, recorded["predicted_inter_host_rows"])
        _check(f"{layout} {name} max/mean", load, recorded["max_mean_load"])
        _check(f"{layout} {name} step", step, recorded["step_s"])
        for shown in step_100mbit:
            _check(f"{layout} {name} step at 100 Mbit/s", shown, slow_link[_HOST_ROWS[name]]["step_s"])
