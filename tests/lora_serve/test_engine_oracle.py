"""Oracle: each request in one mixed batch equals PEFT's generate for its adapter alone (fp32, greedy).

The batch mixes adapters of ranks 1, 8, 16 and 64 with different target modules (one with rsLoRA, one
with a rank_pattern), prompts of different lengths and base-model requests; a small token budget forces
chunked prefill and requests joining and leaving mid-run. Greedy tokens must be identical: fp32 noise
(~1e-6) is far below the logit margins of these scaled-up random models.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lora_serve import Engine, EngineConfig, SamplingParams

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name -> (rank, targets, extra LoRA options)
    "r1": (1, ["q_proj"], {}),
    "r8": (8, ["q_proj", "v_proj"], {"rank_pattern": {"v_proj": 3}}),
    "r16": (16, ["k_proj", "o_proj", *MLP], {"alpha": 7}),
    "r64": (64, ATTENTION + MLP, {"use_rslora": True}),
}
PROMPTS = [
    [5, 17, 33, 9, 41, 77, 12, 150, 3, 99, 64, 23, 180],
    [8, 19],
    [120],
    [44, 45, 46, 47, 48, 49, 50],
    [7, 7, 7, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100, 101, 102, 103, 104, 105, 106, 107],
]
NEW_TOKENS = 10


def _targets(family: str, targets: list[str]) -> list[str]:
    # Mixtral's MLP is fused 3-D experts, not nn.Linear: LoRA there can only target attention.
    return [t for t in targets if t in ATTENTION] if family == "mixtral" else targets


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "mixtral"])
def test_mixed_batch_matches_peft_per_adapter(family, tmp_path, lora, device):
    # On a GPU (the `device` fixture, tests/conftest.py) the engine runs the Triton LoRA kernels; the
    # oracle stays PEFT on the CPU.
    base = lora.tiny_model(family)
    paths = {}
    for seed, (name, (rank, targets, options)) in enumerate(ADAPTERS.items()):
        paths[name] = tmp_path / name
        lora.save_adapter(base, paths[name], rank, _targets(family, targets), seed=seed, **dict(options))

    engine = Engine(copy.deepcopy(base), config=EngineConfig(pool_slots=6000, max_batch_tokens=24, device=device))
    for name, path in paths.items():
        engine.add_adapter(name, path)

    # Every adapter and the base model get two prompts of different lengths, all in one run.
    jobs = [(adapter, PROMPTS[(i + j) % len(PROMPTS)]) for i, adapter in enumerate([*paths, None]) for j in (0, 2)]
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    results = engine.generate([p for _, p in jobs], greedy, [a for a, _ in jobs])

    for (adapter, prompt), result in zip(jobs, results):
        if adapter is None:
            expected = lora.hf_generate(base, prompt, NEW_TOKENS)
        else:
            expected = lora.peft_generate(base, paths[adapter], prompt, NEW_TOKENS)
        assert result.token_ids == expected, f"{family} adapter={adapter} prompt len {len(prompt)}"
    assert engine.pool_stats().kv == 0


def test_adapters_change_the_output(tmp_path, lora):
    """Guard for the oracle test: the random adapters must actually move the greedy tokens."""
    base = lora.tiny_model("llama")
    lora.save_adapter(base, tmp_path / "a", 8, ATTENTION, seed=1)
    prompt = PROMPTS[0]
    assert lora.peft_generate(base, tmp_path / "a", prompt, NEW_TOKENS) != lora.hf_generate(base, prompt, NEW_TOKENS)


def test_model_given_as_directory(tmp_path, lora):
    """An HF model directory loads like the object it was saved from."""
    base = lora.tiny_model("qwen2")
    base.save_pretrained(tmp_path / "model")
    engine = Engine(tmp_path / "model", config=EngineConfig(pool_slots=2000))
    result = engine.generate([PROMPTS[3]], SamplingParams(max_tokens=NEW_TOKENS, temperature=0))[0]
    assert result.token_ids == lora.hf_generate(base, PROMPTS[3], NEW_TOKENS)
    assert engine.model.dtype == torch.float32


@pytest.mark.parametrize(
    "shape",
    [
        # kv width 1 * 24 does not divide the slot width 100 (four vectors per slot, 4 elements left over)
        dict(hidden_size=100, num_attention_heads=5, num_key_value_heads=1, head_dim=24, num_hidden_layers=3),
        # multi-head attention: kv width = slot width; 7 x 2 vectors per token
        dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=3, num_hidden_layers=7),
    ],
    ids=["kv24-in-slot100", "mha-7-layers"],
)
def test_odd_shapes_match_peft(shape, tmp_path, lora):
    base = lora.tiny_model("llama", **shape)
    lora.save_adapter(base, tmp_path / "r3", 3, ATTENTION + MLP, seed=4)
    engine = Engine(copy.deepcopy(base), config=EngineConfig(pool_slots=5000, max_batch_tokens=7))
    engine.add_adapter("r3", tmp_path / "r3")
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    results = engine.generate(PROMPTS[:3], greedy, ["r3", None, "r3"])
    assert results[0].token_ids == lora.peft_generate(base, tmp_path / "r3", PROMPTS[0], NEW_TOKENS)
    assert results[1].token_ids == lora.hf_generate(base, PROMPTS[1], NEW_TOKENS)
    assert results[2].token_ids == lora.peft_generate(base, tmp_path / "r3", PROMPTS[2], NEW_TOKENS)
