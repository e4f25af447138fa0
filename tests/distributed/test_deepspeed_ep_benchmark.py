"""moeplug's EP=4 layer equals DeepSpeed's `deepspeed.moe.layer.MoE(ep_size=4)` on 4 gloo ranks.

Runs benchmarks/expert_parallel.py at its smoke size: before timing it compares outputs, input
gradients and router / expert weight gradients of the two layers on every rank (same weights,
tokens and routing; DeepSpeed dropless and deterministic). No timing is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(400)]
ROOT = Path(__file__).resolve().parents[2]


def test_expert_parallel_layer_matches_deepspeed_moe_on_4_ranks(tmp_path):
    out = tmp_path / "ep.json"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ROOT / ".venv" / "torch_extensions")}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "expert_parallel.py"), "--smoke", "--ranks", "4",
                    "--output", str(out)], check=True, cwd=ROOT, env=env, timeout=360, capture_output=True)
    result = json.loads(out.read_text())["results"][0]
    assert result["ranks"] == 4
    diffs = result["max_abs_differences"]
    assert set(diffs) == {"output", "input_grad", "router_grad", "gate_up_grad", "down_grad"}
    # fp32: outputs and input gradients sum k terms per token; weight gradients sum over all received
    # rows, in another order (the 1e-5 / 1e-4).
    assert diffs["output"] < 1e-5 and diffs["input_grad"] < 1e-5, diffs
    assert max(diffs["router_grad"], diffs["gate_up_grad"], diffs["down_grad"]) < 1e-4, diffs
    for layer in ("moeplug", "deepspeed"):
        medians = result["medians_s"][layer]
        assert all(medians[phase] > 0 for phase in ("dispatch", "experts", "combine", "step")), medians
