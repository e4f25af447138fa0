"""Oracle: PEFT adapters with LoRA on fused MoE experts, served in one mixed batch, equal PEFT per adapter.

Tiny MoE bases of four families (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE with top-3 routing,
OLMoE; Mixtral also with top-1) carry three PEFT adapters of different ranks that put LoRA on the fused
expert parameters (``target_parameters``): one on experts alone; one on experts, attention (and Qwen2-MoE's
shared expert and its gate) with a ``rank_pattern`` giving its two expert projections different ranks; one
on ``gate_up_proj`` alone (PEFT saves it without the nested ``base_layer``); one on the router weight
(``mlp.gate.weight``), experts and attention, so its rows route differently from the others'. Adapters written with the
pre-fusion names (``target_modules`` w1/w2/w3 or gate/up/down_proj), which PEFT converts to
``target_parameters`` with rank and alpha patterns, are served too. The engine runs them with base-model
rows in one batch, prompts of 1, 7 and 13 tokens
and a token budget that splits prefills; tokens routed to an expert with no other token, and experts with
no token at all, occur in every decode step (6 experts, 2-4 tokens).

The oracle is PEFT's own ``PeftModel`` (which applies ``W + ΔW`` for every expert) on the same weights:
greedy tokens must be identical, and every sampled row's logits must equal PEFT's teacher-forced logits at
that position. fp32 tolerance: the engine computes ``x Wᵀ + (x Aᵀ) Bᵀ`` (grouped, factored) where PEFT
computes ``x (W + BA)ᵀ``, the same math in another summation order. Logits here are at most ~2.5 in size, so
fp32 rounding (relative 6e-8 per operation, accumulated over ~100-term sums in 2 layers) gives differences
of a few 1e-6: measured max 3.8e-6 over the five cases. 2e-5 leaves a margin of ~5x; a wrong expert,
adapter, rank or scale moves logits by more than 0.02 (``test_expert_adapters_change_the_output``).
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from peft import PeftModel

from lora_serve import Engine, EngineConfig, SamplingParams

_COMMON = dict(vocab_size=96, hidden_size=44, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
               max_position_embeddings=128, head_dim=12, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
               pad_token_id=0)
# Awkward sizes (hidden 44, expert width 40: gate_up is 80 wide, two 44-wide pool slots per rank-row).
FAMILIES = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=40, num_local_experts=6, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=56, moe_intermediate_size=40, num_experts=6,
                                         num_experts_per_tok=2, shared_expert_intermediate_size=52,
                                         decoder_sparse_step=1, mlp_only_layers=[])),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=56, moe_intermediate_size=40, num_experts=6,
                                         num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=1,
                                         mlp_only_layers=[])),
    "olmoe": ("OlmoeConfig", dict(hidden_size=48, intermediate_size=40, num_experts=6, num_experts_per_tok=2)),
}
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ADAPTERS = {  # name -> (rank, target_modules, target_parameters, extra LoRA options)
    "experts_r4": (4, [], EXPERTS, {}),
    "attn_experts_r8": (8, ["q_proj", "v_proj"], EXPERTS, {"rank_pattern": {"mlp.experts.down_proj": 3}}),
    "gate_up_r16": (16, [], ["mlp.experts.gate_up_proj"], {"alpha": 24}),
    "router_experts_r6": (6, ["o_proj"], ["mlp.gate.weight", *EXPERTS], {}),  # LoRA on the router's weight too
}
PROMPTS = [[5, 17, 33, 9, 41, 77, 12], [60], [44, 45, 46, 47, 48, 49, 50, 8, 19, 3, 90, 91, 92]]
NEW_TOKENS = 6
ATOL = 2e-5  # fp32, see the module docstring


def adapters_for(family: str) -> dict:
    """``ADAPTERS``; on Qwen2-MoE the attention adapter also covers the shared expert and its gate (plain
    linears the others lack; PEFT would read a bare ``up_proj`` on Qwen3-MoE/OLMoE as the fused experts)."""
    if family != "qwen2_moe":
        return ADAPTERS
    rank, modules, params, options = ADAPTERS["attn_experts_r8"]
    shared = [r"shared_expert\.up_proj", r"shared_expert\.down_proj", "shared_expert_gate"]
    return {**ADAPTERS, "attn_experts_r8": (rank, modules + shared, params, options)}


def tiny_moe(family: str, seed: int = 0, dtype=torch.float32, **overrides) -> torch.nn.Module:
    """A seeded tiny causal LM of ``family``; routers scaled up so routing is decisive and uneven.

    Its experts run transformers' eager per-expert loop (the plainest oracle; transformers' ``grouped_mm``
    refuses these odd widths in bf16 on CPU). The engine switches its own copy to grouped GEMMs.
    """
    class_name, extra = FAMILIES[family]
    config = getattr(transformers, class_name)(**{**_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 3:  # fused experts
                param.normal_(0.0, 0.1)
            elif name.endswith("gate.weight"):  # routers (and Qwen2-MoE's shared-expert gate)
                param.normal_(0.0, 0.5)
            elif param.dim() > 1:
                param.mul_(4)
    model.set_experts_implementation("eager")
    return model.to(dtype).eval()


def save_adapters(lora, base, tmp_path, adapters=ADAPTERS) -> dict:
    """Save each adapter of ``adapters`` for ``base`` (random A and B, std 0.1) and return name -> path."""
    paths = {}
    for seed, (name, (rank, modules, params, options)) in enumerate(adapters.items()):
        paths[name] = tmp_path / name
        lora.save_adapter(base, paths[name], rank, modules, seed=seed, std=0.1, target_parameters=params, **options)
    return paths


def record_logits(engine: Engine) -> dict[str, list[torch.Tensor]]:
    """Wrap the engine's runner so every sampled row's logits are kept, by request id, in step order."""
    seen: dict[str, list[torch.Tensor]] = {}
    execute = engine.runner.execute

    def recording(scheduled, adapter_index):
        logits, sampled = execute(scheduled, adapter_index)
        for row, request in zip(logits, sampled):
            seen.setdefault(request.request_id, []).append(row.float().clone())
        return logits, sampled

    engine.runner.execute = recording
    return seen


def oracle_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """PEFT's (or the base model's) logits predicting each generated token, teacher-forced: ``[len(tokens), V]``."""
    ids = torch.tensor([prompt + tokens[:-1]])
    with torch.no_grad():
        return model(ids).logits[0, len(prompt) - 1 :].float()


def run_mixed(engine, paths, prompts=PROMPTS, new_tokens=NEW_TOKENS):
    """Every adapter and the base model on every prompt, all in one ``generate``; returns (jobs, completions)."""
    jobs = [(adapter, prompt) for adapter in [*paths, None] for prompt in prompts]
    greedy = SamplingParams(max_tokens=new_tokens, temperature=0)
    return jobs, engine.generate([p for _, p in jobs], greedy, [a for a, _ in jobs])


def check_mixed_batch(lora, base, paths, where: str, prompts=PROMPTS, new_tokens=NEW_TOKENS, **config) -> Engine:
    """Register ``paths`` in an engine on ``base`` (``config``: EngineConfig fields), run them and the base on
    ``prompts`` in one mixed batch, and check each request's tokens and every sampled row's logits against PEFT's
    ``PeftModel`` for its adapter alone (the base model for base rows). Returns the engine."""
    engine = Engine(copy.deepcopy(base), config=EngineConfig(**{"pool_slots": 20000, "max_batch_tokens": 64, **config}))
    for name, path in paths.items():
        engine.add_adapter(name, path)
    logits = record_logits(engine)
    jobs, results = run_mixed(engine, paths, prompts, new_tokens)
    oracles = {name: PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval() for name, path in paths.items()}
    oracles[None] = base
    for (adapter, prompt), result in zip(jobs, results):
        at = f"{where} adapter={adapter} prompt of {len(prompt)}"
        expected = lora.hf_generate(oracles[adapter], prompt, new_tokens)
        assert result.token_ids == expected, at
        got = torch.stack(logits[result.request_id]).cpu()
        torch.testing.assert_close(got, oracle_logits(oracles[adapter], prompt, expected), atol=ATOL, rtol=0,
                                   msg=lambda m: f"{at}: {m}")
    return engine


@pytest.mark.parametrize(
    "family, overrides",
    [("mixtral", {}), ("mixtral", {"num_experts_per_tok": 1}), ("qwen2_moe", {}), ("qwen3_moe", {}), ("olmoe", {})],
    ids=["mixtral", "mixtral-top1", "qwen2_moe", "qwen3_moe-top3", "olmoe"],
)
def test_mixed_batch_matches_peft_per_adapter(family, overrides, tmp_path, lora, device):
    base = tiny_moe(family, **overrides)
    paths = save_adapters(lora, base, tmp_path, adapters_for(family))
    # A 16-token budget splits the 13-token prompts' prefills across steps and mixes them with decodes.
    check_mixed_batch(lora, base, paths, family, max_batch_tokens=16, device=device)


@pytest.mark.parametrize(
    "family, legacy", [("mixtral", ["w1", "w2", "w3"]), ("qwen3_moe", ["gate_proj", "up_proj", "down_proj"])]
)
def test_adapters_with_pre_fusion_target_names_match_peft(family, legacy, tmp_path, lora):
    """PEFT turns ``target_modules`` naming the per-expert linears of transformers 4 into ``target_parameters``
    (bare ``gate_up_proj``/``down_proj``) with ``.*\\.gate_up_proj`` rank and alpha patterns (2r, 2 alpha):
    such adapters, as users trained them, are served as PEFT runs them."""
    base = tiny_moe(family)
    paths = save_adapters(lora, base, tmp_path, {"legacy": (4, ["q_proj", *legacy], None, {})})
    config = (tmp_path / "legacy" / "adapter_config.json").read_text()
    assert '"gate_up_proj"' in config and "rank_pattern" in config  # PEFT did convert them
    check_mixed_batch(lora, base, paths, family)


def test_layer_prefixed_targets_as_the_demo_recipe_writes_them(tmp_path, lora):
    """``target_parameters`` naming one layer's experts (``layers.1.mlp.experts.gate_up_proj``; PEFT ignores
    ``layers_to_transform`` for them) adapt that layer's experts only."""
    base = tiny_moe("mixtral")
    layer_one = [f"layers.1.{name}" for name in EXPERTS]
    paths = save_adapters(lora, base, tmp_path, {"top": (4, ["q_proj"], layer_one, {"layers_to_transform": [1]})})
    engine = check_mixed_batch(lora, base, paths, "layer 1 only")
    assert engine.list_adapters()[0].num_modules == 3  # q_proj, gate_up_proj and down_proj of layer 1


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_bf16_mixed_batch_matches_peft_in_bf16(family, tmp_path, lora):
    """bf16 (what users serve): each row's prefill logits, all adapters and the base in one batch, against
    PEFT on the same bf16 model. Both round to bf16 at every layer (spacing 1/64 at logits ~2, the largest
    here) in different places: measured max 0.027 apart, as far as PEFT bf16 is from PEFT fp32 (0.036).
    0.06 is ~4 roundings; every adapter moves some logit by more than 0.3, so a lost LoRA cannot pass."""
    base = tiny_moe(family)
    paths = save_adapters(lora, base, tmp_path)
    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    engine = Engine(copy.deepcopy(bf16), config=EngineConfig(pool_slots=20000, max_batch_tokens=64))
    for name, path in paths.items():
        engine.add_adapter(name, path)
    logits = record_logits(engine)
    jobs = [(adapter, prompt) for adapter in [*paths, None] for prompt in PROMPTS]
    results = engine.generate([p for _, p in jobs], SamplingParams(max_tokens=1), [a for a, _ in jobs])
    for (adapter, prompt), result in zip(jobs, results):
        oracle = bf16 if adapter is None else PeftModel.from_pretrained(copy.deepcopy(bf16), str(paths[adapter]))
        expected = oracle_logits(oracle.eval(), prompt, [0])[-1]
        torch.testing.assert_close(logits[result.request_id][0], expected, atol=0.06, rtol=0)
        if adapter is not None:
            assert (expected - oracle_logits(bf16, prompt, [0])[-1]).abs().max() > 0.3


def test_expert_adapters_change_the_output(tmp_path, lora):
    """Guard for the oracle test: each adapter moves the logits by far more than the tolerance."""
    base = tiny_moe("mixtral")
    paths = save_adapters(lora, base, tmp_path)
    prompt = PROMPTS[0]
    reference = oracle_logits(base, prompt, [0])
    for path in paths.values():
        adapted = oracle_logits(PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval(), prompt, [0])
        assert (adapted - reference).abs().max() > 1000 * ATOL


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_router_only_adapter_reroutes_tokens_as_peft(family, tmp_path, lora):
    """LoRA on the router weight alone changes only which experts tokens go to (and their gate weights):
    the engine's per-row router LoRA must reproduce PEFT's routing, in a batch with base rows."""
    base = tiny_moe(family)
    paths = save_adapters(lora, base, tmp_path, {"router": (4, [], ["mlp.gate.weight"], {"alpha": 16})})
    adapted = PeftModel.from_pretrained(copy.deepcopy(base), str(paths["router"])).eval()
    assert (oracle_logits(adapted, PROMPTS[0], [0]) - oracle_logits(base, PROMPTS[0], [0])).abs().max() > 0.1
    check_mixed_batch(lora, base, paths, family)


def test_pool_accounting_hot_unload_and_eviction(tmp_path, lora):
    """Expert LoRA pages are counted like any adapter's, freed on unload and eviction, and come back right."""
    base = tiny_moe("mixtral")
    paths = save_adapters(lora, base, tmp_path)
    config = EngineConfig(pool_slots=20000, max_batch_tokens=64, max_resident_adapters=2)
    engine = Engine(copy.deepcopy(base), config=config)
    infos = {name: engine.add_adapter(name, path) for name, path in paths.items()}
    # experts_r4 on 2 layers: gate_up (6 experts x r4 x (1 slot of A + 2 of B^T)) + down (6 x 4 x (1 + 1)).
    assert infos["experts_r4"].pool_slots == 2 * (6 * 4 * 3 + 6 * 4 * 2)
    assert engine.pool_stats().adapters == 0  # registered, not resident

    prompt = PROMPTS[0]
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    expected = {n: lora.peft_generate(base, p, prompt, NEW_TOKENS) for n, p in paths.items()}
    for name in ["experts_r4", "attn_experts_r8"]:
        assert engine.generate([prompt], greedy, name)[0].token_ids == expected[name]
    assert engine.pool_stats().adapters == infos["experts_r4"].pool_slots + infos["attn_experts_r8"].pool_slots
    # A third adapter with room for two residents evicts the least recently used one.
    assert engine.generate([prompt], greedy, "gate_up_r16")[0].token_ids == expected["gate_up_r16"]
    assert engine.stats().adapter_evictions == 1
    assert engine.pool_stats().adapters == infos["attn_experts_r8"].pool_slots + infos["gate_up_r16"].pool_slots

    engine.remove_adapter("gate_up_r16")
    assert engine.pool_stats().adapters == infos["attn_experts_r8"].pool_slots
    engine.pin_adapter("experts_r4")
    engine.add_adapter("gate_up_again", paths["gate_up_r16"])  # hot load under a new name
    results = engine.generate([prompt] * 3, greedy, ["gate_up_again", "experts_r4", None])
    assert [r.token_ids for r in results] == [
        expected["gate_up_r16"], expected["experts_r4"], lora.hf_generate(base, prompt, NEW_TOKENS)
    ]
    assert engine.adapters.residency.get("experts_r4").pinned
    assert engine.pool_stats().kv == 0


def _edit_adapter(src, dst, config_change=None, drop_keys=""):
    """A copy of the adapter in ``src`` at ``dst``, its config updated by ``config_change`` and without the
    tensors whose key contains ``drop_keys`` (an empty string drops nothing)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, **(config_change or {})}))
    tensors = load_file(dst / "adapter_model.safetensors")
    kept = {k: v for k, v in tensors.items() if not drop_keys or drop_keys not in k}
    save_file(kept, dst / "adapter_model.safetensors")
    return dst


def test_bad_expert_adapters_are_refused_by_name_and_others_keep_serving(tmp_path, lora):
    base = tiny_moe("mixtral")
    good = save_adapters(lora, base, tmp_path / "good", {"ok": ADAPTERS["experts_r4"]})["ok"]
    other_base = tiny_moe("mixtral", num_local_experts=4)
    four_experts = save_adapters(lora, other_base, tmp_path / "four", {"e4": ADAPTERS["experts_r4"]})["e4"]
    engine = Engine(copy.deepcopy(base), config=EngineConfig(pool_slots=1500, max_batch_tokens=64))
    engine.add_adapter("ok", good)
    prompt, greedy = PROMPTS[0], SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    before = engine.generate([prompt], greedy, "ok")[0].token_ids
    pool_before = engine.pool_stats().adapters

    bad = {
        "no such parameter": (
            _edit_adapter(good, tmp_path / "up", {"target_parameters": ["mlp.experts.up_proj", EXPERTS[1]]}),
            r"target_parameters entry 'mlp.experts.up_proj' names no expert or router parameter of the base model "
            r"\(LoRA on parameters is served for \['experts.down_proj', 'experts.gate_up_proj', 'gate.weight'\]\)",
        ),
        "expert count": (
            four_experts,
            r"model.layers.0.mlp.experts.lora_A.weight \(16, 40\) / .lora_B.weight \(44, 16\) do not fit "
            r"model.layers.0.mlp.experts.down_proj \(6 experts, 40 -> 44\) with r=4: "
            r"expected \(24, 40\) and \(44, 24\)",
        ),
        "missing tensors": (
            _edit_adapter(good, tmp_path / "half", drop_keys="layers.1.mlp.experts.lora_"),
            r"target_parameters covers 'model.layers.1.mlp.experts.down_proj', but adapter_model.safetensors has no "
            r"'base_model.model.model.layers.1.mlp.experts.lora_A.weight'",
        ),
        "a linear's weight": (
            _edit_adapter(good, tmp_path / "q", {"target_parameters": ["self_attn.q_proj.weight"]}),
            r"target_parameters entry 'self_attn.q_proj.weight' names no expert or router parameter",
        ),
        "rank the pool cannot hold": (
            save_adapters(lora, base, tmp_path / "big", {"big": (64, [], EXPERTS, {})})["big"],
            r"adapter 'big' needs 3840 pool slots but the pool has only 1500",
        ),
    }
    for what, (path, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            engine.add_adapter("big" if "rank" in what else "bad", path)
    assert [a.name for a in engine.list_adapters()] == ["ok"]
    assert engine.pool_stats().adapters == pool_before
    assert engine.generate([prompt], greedy, "ok")[0].token_ids == before == lora.peft_generate(
        base, good, prompt, NEW_TOKENS
    )


@pytest.mark.parametrize(
    "config, message",
    [
        (transformers.DeepseekV3Config(**{**_COMMON, "head_dim": 8}, intermediate_size=56, moe_intermediate_size=40,
                                       n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                                       q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=12,
                                       v_head_dim=12),
         r"cannot serve 'deepseek_v3' models: their multi-head latent attention \(keys 20 and values 12 wide"),
        (transformers.GptOssConfig(**_COMMON, intermediate_size=40, num_local_experts=6, num_experts_per_tok=2),
         r"cannot serve 'gpt_oss' models: their attention adds learned sink logits"),
    ],
    ids=["deepseek_v3", "gpt_oss"],
)
def test_families_whose_attention_does_not_fit_are_refused_by_name(config, message):
    with pytest.raises(ValueError, match=message):
        Engine(transformers.AutoModelForCausalLM.from_config(config))


@pytest.mark.slow
def test_triton_path_matches_peft(tmp_path, lora, device):
    """The GPU code path end to end on a CPU machine: Triton grouped GEMMs and expert-LoRA shrink/expand in the
    interpreter (~1 min), on a short mixed batch; same tokens and logits as PEFT (fp32 tolerance as above).
    On a GPU machine the oracle tests above run these kernels compiled."""
    from kernels import use_backend

    if device.type != "cpu":
        pytest.skip("the oracle tests above run the Triton path on this GPU")
    base = tiny_moe("qwen3_moe")
    paths = save_adapters(lora, base, tmp_path)
    with use_backend("triton"):
        check_mixed_batch(lora, base, paths, "triton", prompts=PROMPTS[:1], new_tokens=2)
