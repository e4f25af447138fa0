"""``benchmarks/kernel_gpu.py --smoke`` runs end to end: every implementation of every op is timed and ours
agrees with each baseline. Without a GPU the script runs Triton's interpreter itself; with one, tiny bf16
shapes. A benchmark is not a test: no timing is asserted.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OPS = {"grouped_mm fwd", "grouped_mm fwd+bwd", "grouped_swiglu fwd", "lora shrink+expand", "fp8 quantize e4m3",
       "fp8 dequantize e4m3", "fp8 quantize expanded", "fp8 dequantize expanded"}  # fmt: skip
# The `check` column: max |ours - baseline| / max |baseline|. fp32 sums in another order; bf16 rounds the
# outputs (8 mantissa bits: 2**-8 relative) where the baselines round intermediates too.
CHECK_TOL = {"float32": 1e-5, "bfloat16": 2e-2}

pytestmark = pytest.mark.slow  # a subprocess that imports torch and runs the interpreter


def test_smoke_run_times_every_implementation(tmp_path):
    # The script decides interpreted vs compiled itself, before defining kernels; PYTHONPATH for `kernels`
    # where the project is not installed.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "benchmarks/kernel_gpu.py", "--smoke", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    rows = json.loads((tmp_path / "kernel_gpu.json").read_text())["rows"]
    assert {r["op"] for r in rows} == OPS
    for row in rows:
        label = f"{row['op']} {row['shape']}"
        assert len(row["impls"]) >= 2, label
        assert all(r.get("ms", 0) > 0 for r in row["impls"].values()), (label, row["impls"])
        check = row["check"]
        if check.startswith("codes identical"):
            assert check.endswith("True"), (label, check)
        elif check.startswith("codes 1 step off"):
            assert check.endswith("max 0") or check.endswith("max 1"), (label, check)
        elif check:  # the fwd+bwd rows have none
            assert float(check) <= CHECK_TOL[row["dtype"]], (label, check)
    assert "| grouped_mm fwd | smoke |" in (tmp_path / "kernel_gpu.md").read_text()
