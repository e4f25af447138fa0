"""Reading benchmarks/RESULTS.md tables and the JSON of recorded runs, for the claim tests (test_claims*.py).

A table's numbers match a JSON value when |shown - recorded| <= half a unit of the last shown digit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
RESULTS = ROOT / "benchmarks" / "results"
NUMBER = re.compile(r"(?:(?<![\w.])-)?\d[\d,]*(?:\.\d+)?")  # "2.4-2.9" is 2.4 and 2.9; "-20.0%" is negative
# (part of the section heading / bold line, first header cell, occurrence): the tables test_claims*.py read.
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
    ("Issue 23: expert parallelism across hosts", "2 hosts x 2 ranks", 0),
    ("Issue 23: expert parallelism across hosts", "4 hosts x 1 rank", 0),
    ("Issue 22: compressed adapter collections", "N", 0),
    ("Issue 22: compressed adapter collections", "clusters x rank", 0),
    ("FP8AdamW as the ZeRO-Offload optimizer", "optimizer", 0), ("FP8AdamW as the ZeRO-Offload optimizer", "optimizer", 1),
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
