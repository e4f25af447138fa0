"""Every declared GPU config of every kernel compiles for A100 (sm_80) and H100 (sm_90a), on this CPU.

Runs ``python -m kernels._aot --json`` in a subprocess: this test session defines the kernels under
``TRITON_INTERPRET=1`` (see conftest.py), and interpreted kernels cannot be compiled. Skips, never fails,
where the triton wheel's ptxas/cuobjdump are missing.
"""

import json
import os
import subprocess
import sys

import pytest

from kernels import _aot

pytestmark = pytest.mark.slow  # compiles every kernel config for two GPU architectures (~45 s)


@pytest.fixture(scope="module")
def reports(device):
    if device.type == "cuda":
        pytest.skip("on a GPU the oracle tests compile every kernel for real; this check is for GPU-less machines")
    reason = _aot.missing_toolchain()
    if reason:
        pytest.skip(f"no Triton NVIDIA toolchain: {reason}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's current default; silences its warning
    done = subprocess.run(
        [sys.executable, "-m", "kernels._aot", "--json"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["reports"]


def test_every_kernel_module_is_discovered(reports):
    modules = {r["module"] for r in reports}
    assert {"_grouped_gemm_triton", "_lora_triton"} <= modules
    assert {r["arch"] for r in reports} == {"sm_80", "sm_90a"}


def test_no_register_spills(reports):
    spilling = [f"{r['name']} on {r['arch']}: {r['spill_store_bytes']}/{r['spill_load_bytes']} B" for r in reports
                if r["spill_store_bytes"] or r["spill_load_bytes"]]  # fmt: skip
    assert not spilling, "register spills (store/load bytes): " + "; ".join(spilling)


def test_shared_memory_fits_the_device(reports):
    too_big = [f"{r['name']} on {r['arch']}: {r['shared_bytes']} > {r['shared_limit_bytes']} B" for r in reports
               if r["shared_bytes"] > r["shared_limit_bytes"]]  # fmt: skip
    assert not too_big, "; ".join(too_big)


def test_hopper_gemm_configs_use_wgmma(reports):
    expected = [r for r in reports if r["expect_wgmma_sm90"] and r["arch"] == "sm_90a"]
    assert expected, "no case declares expect_wgmma_sm90"
    missing = [r["name"] for r in expected if not r["wgmma"]]
    assert not missing, f"no wgmma in the sm_90a build of {missing}"
