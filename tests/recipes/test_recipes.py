"""The launch recipes run with 2 processes for a few steps, train, and write loadable outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from torch.distributed.elastic.utils.distributed import get_free_port

import moeplug
from moeplug.checkpoint import load_checkpoint
from moeplug.demo import demo_model

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(command: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ROOT / ".venv" / "torch_extensions"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_accelerate_recipe_with_expert_parallelism(tmp_path):
    _run([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
          "recipes/accelerate/train_moe.py", "--steps", "4", "--micro-batches", "2", "--batch", "2",
          "--length", "32", "--ep-size", "2", "--lr", "3e-3", "--output", str(tmp_path)], tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ranks"] == 2 and len(summary["step_losses"]) == 4
    assert summary["step_losses"][-1] < summary["step_losses"][0]
    _assert_export_matches_checkpoint(tmp_path)


def _assert_export_matches_checkpoint(tmp_path: Path) -> None:
    """The sharded checkpoint and the transformers export hold the same trained model."""
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    resumed = demo_model(seed=1)
    moeplug.patch_model(resumed)
    load_checkpoint(resumed, tmp_path / "moeplug")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(resumed.eval()(ids).logits, exported(ids).logits, atol=1e-5, rtol=0)
    assert not torch.allclose(exported(ids).logits, demo_model(seed=0).eval()(ids).logits)  # it trained


def _deepspeed_recipe_with_ep2(launcher: list[str], steps: int, tmp_path: Path) -> dict:
    """Run recipes/deepspeed/train_moe.py with --ep-size 2 under `launcher`; its summary.json."""
    # A free port: the launchers' default 29500 may be taken by another run on this machine.
    _run([*launcher, "--master_port", str(get_free_port()), "recipes/deepspeed/train_moe.py",
          "--deepspeed_config", "recipes/deepspeed/ds_config.json", "--steps", str(steps), "--length", "32",
          "--ep-size", "2", "--lr", "3e-3", "--output", str(tmp_path)], tmp_path)
    return json.loads((tmp_path / "summary.json").read_text())


def test_deepspeed_recipe_zero2_expert_parallel_torchrun(tmp_path):
    summary = _deepspeed_recipe_with_ep2([str(BIN / "torchrun"), "--nproc_per_node", "2"], 3, tmp_path)
    assert summary["zero_stage"] == 2 and summary["ep_size"] == 2 and summary["has_moe_layers"]
    assert len(summary["step_losses"]) == 3
    assert summary["step_losses"][-1] < summary["step_losses"][0]
    assert summary["metrics"]["moe/max_over_mean"] >= 1.0
    _assert_export_matches_checkpoint(tmp_path)


def test_deepspeed_recipe_deepspeed_launcher(tmp_path):
    summary = _deepspeed_recipe_with_ep2([str(BIN / "deepspeed"), "--num_gpus", "2"], 2, tmp_path)
    assert summary["ranks"] == 2 and summary["ep_size"] == 2 and len(summary["step_losses"]) == 2
