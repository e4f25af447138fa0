"""FP8AdamW as a DeepSpeed ZeRO-1/2 client optimizer: its state survives save -> load -> resume.

DeepSpeed hands the optimizer one flat fp32 partition per rank; the FP8 state must be built over that
partition (codes the partition's size, one amax / k16 per 128 of it) and restored unchanged: DeepSpeed
once re-sharded bitsandbytes' quantisation map as if it were a partition and broke restores. Each rank
runs deepspeed_resume.py in its own process (gloo on CPU); the first run compiles DeepSpeed's shared-
memory op (30-150 s here), cached in TORCH_EXTENSIONS_DIR (torch's default cache unless set).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lora_serve.testing import free_port

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(420)]


@pytest.mark.parametrize("stage, world_size", [(1, 1), (2, 2)])
def test_zero_checkpoint_resumes_identically(stage, world_size, tmp_path):
    script = Path(__file__).with_name("deepspeed_resume.py")
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), str(stage), str(tmp_path / "ckpt")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=Path(__file__).parents[2]))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err[-4000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    total = sum(r["partition_numel"] for r in results)
    assert total >= 64 * 96 + 96 + 96 * 37 + 37  # every parameter is in some rank's partition
    for r in results:
        assert r["identical"], r
        assert r["step"] == 6.0
        assert r["codes_dtype"] == "torch.float8_e4m3fn" and r["k16_dtype"] == "torch.uint8"
        assert r["codes_numel"] == r["partition_numel"]
        assert r["amax_numel"] == -(-r["partition_numel"] // 128)
