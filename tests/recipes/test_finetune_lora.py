"""The train-to-serve path of recipes/finetune_lora end to end, shortened: a tiny Mixtral base, two adapters
(one trained on 2 processes by ``accelerate launch``, one by the ``deepspeed`` launcher with ZeRO-2,
both with FP8AdamW), a real ``lora-serve`` process queried with the openai client.

Oracles: PEFT's own greedy ``generate`` with each adapter alone must give exactly the text the server
returned for that adapter, and transformers' the base's; PEFT's loss says each adapter learned its task.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "finetune_lora"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run the shortened demo once; returns (output dir, summary.json)."""
    out = tmp_path_factory.mktemp("finetune_lora")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ROOT / ".venv" / "torch_extensions"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(RECIPE / "demo.py"), "--out", str(out), "--tasks", "upper,novowels",
               "--steps", "12", "--launcher", "accelerate,deepspeed", "--nproc", "2", "--max-tokens", str(MAX_TOKENS)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out, json.loads((out / "summary.json").read_text())


def _greedy(model, tokenizer, prompt: str) -> str:
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                             do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _base(out: Path):
    return AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32).eval()


def test_served_adapters_equal_peft(demo):
    out, summary = demo
    tokenizer = AutoTokenizer.from_pretrained(out / "base")
    answers, prompts = summary["answers"], summary["prompts"]
    assert set(answers) == {"base", "upper", "novowels"} and len(prompts) == 3
    base = _base(out)
    assert {p: _greedy(base, tokenizer, text) for p, text in prompts.items()} == answers["base"]
    for name in ("upper", "novowels"):
        peft_model = PeftModel.from_pretrained(_base(out), str(out / "adapters" / name)).eval()
        expected = {p: _greedy(peft_model, tokenizer, text) for p, text in prompts.items()}
        assert expected == answers[name], name
        # It trained: the adapter changes what the model writes.
        assert answers[name] != answers["base"], name


def test_each_adapter_learned_its_task(demo):
    out, summary = demo
    losses = summary["losses"]  # PEFT's held-out loss of each model on each task
    for own, other in (("upper", "novowels"), ("novowels", "upper")):
        assert losses[own][own] < losses["base"][own], losses
        assert losses[own][own] < losses[other][own], losses
    launchers = {}
    for name in ("upper", "novowels"):
        metrics = json.loads((out / "adapters" / name / "train_metrics.json").read_text())
        assert metrics["processes"] == 2 and metrics["optimizer"] == "FP8AdamW" and len(metrics["train_losses"]) == 12
        assert metrics["held_out_loss_after"] < metrics["held_out_loss_before"]
        launchers[name] = metrics["launcher"]
    assert launchers == {"upper": "accelerate", "novowels": "deepspeed ZeRO-2"}
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "loss on upper" in (out / "eval_table.md").read_text()
