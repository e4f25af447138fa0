"""``benchmarks/adapter_compression.py --smoke`` runs end to end (adapters trained on synthetic tasks, compressed,
served compressed and not, held-out losses) and reports every figure the RESULTS.md section prints. A benchmark
is not a test: no timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # a fresh interpreter trains 4 adapters and builds two engines


def test_smoke_run_reports_throughput_memory_and_loss(tmp_path):
    out = tmp_path / "adapter_compression.json"
    done = subprocess.run([sys.executable, "benchmarks/adapter_compression.py", "--smoke", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)  # a hang guard, not a timing
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())["result"]
    assert set(result["throughput"]) == {"base", "uncompressed-4", "compressed-4"}
    assert all(r["tokens_per_s"] > 0 for r in result["throughput"].values())
    memory = result["compression"]["4"]["memory"]
    assert 0 < memory["compressed_core_bytes"] < memory["uncompressed_bytes"]
    losses = result["quality"]["mean"]
    # The adapters were trained on their tasks: each beats the base model on its own held-out data.
    assert losses["uncompressed"] < losses["base"]
    assert "| 4 |" in done.stdout
