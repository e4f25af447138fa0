"""The README's demo and the P1 benchmark keep running (tiny sizes; no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moeplug import demo

pytestmark = pytest.mark.slow  # runs the demo and a benchmark smoke in subprocesses: not in `make test-fast`

ROOT = Path(__file__).resolve().parents[2]


def test_demo_trains_and_reports_loads(capsys):
    demo.main(["--steps", "3", "--batch", "2", "--length", "32"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("model.layers.")]
    assert len(rows) == 4
    for row in rows:  # 2 sequences x 32 tokens x top-2 assignments per layer, all counted
        loads = [int(v) for v in row.split("max/mean")[0].split()[1:]]
        assert len(loads) == 8 and sum(loads) == 2 * 32 * 2
    assert "transformers grouped_mm" in out and "x moeplug's time" in out


def test_moe_layer_benchmark_smoke(tmp_path):
    out = tmp_path / "p1.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe_layer.py"), "--smoke", "--repeats", "1",
                    "--warmup", "1", "--out", str(out)], check=True, cwd=ROOT, timeout=300)
    result = json.loads(out.read_text())["results"][0]
    assert set(result["seconds_per_step"]) == {"eager", "batched_mm", "grouped_mm", "moeplug", "dense roof"}
    assert all(v > 0 for v in result["seconds_per_step"].values())


def test_expert_lora_training_benchmark_smoke(tmp_path):
    out = tmp_path / "expert_lora.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "expert_lora_training.py"), "--smoke", "--json", str(out)],
                   check=True, cwd=ROOT, timeout=300)
    result = next(iter(json.loads(out.read_text())["results"].values()))
    assert set(result["seconds"]) == set(result["extra_memory_bytes"]) == {"transformers + PEFT", "moeplug + PEFT"}
    assert all(v > 0 for v in result["seconds"].values())
