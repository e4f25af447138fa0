"""`benchmarks/placement.py --smoke --measure` runs end to end (tiny model, 4 gloo processes; no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ABSTRACTS = ROOT.parent / "shared" / "data" / "abstracts.txt"

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


@pytest.mark.skipif(not ABSTRACTS.exists(), reason=f"the benchmark corpus {ABSTRACTS} is not here")
def test_placement_benchmark_smoke(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "placement.py"), "--smoke", "--measure",
                    "--abstracts", str(ABSTRACTS), "--out", str(tmp_path)], check=True, cwd=ROOT, timeout=280)
    result = json.loads((tmp_path / "result.json").read_text())
    assert {"contiguous", "greedy_coherent", "greedy_replicas4", "ilp_standard"} <= set(result["placements"])
    measured = result["measured"]
    assert set(measured) == {f"{p}/{d}" for p in ("contiguous", "greedy_coherent", "greedy_replicas4", "ilp_standard")
                             for d in ("dedup", "per_choice")}
    for placement in ("contiguous", "ilp_standard"):
        # The deduplicating dispatch never sends more rows than the per-(token, choice) one, on the same tokens.
        dedup, per_choice = (measured[f"{placement}/{d}"]["cross_rank_rows_per_step"] for d in ("dedup", "per_choice"))
        assert 0 < dedup <= per_choice
    assert set(result["replica_sweep"]) == {"0", "4"}
    assert (tmp_path / "fit.safetensors").exists() and (tmp_path / "held_out.safetensors").exists()
