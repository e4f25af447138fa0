"""Issue 19 (serving): mixed batches of adapters with LoRA on attention AND fused MoE experts, vs PEFT and HF.

The P2 set-up (``lora_serving.py``: closed batch, Zipf(1) adapter popularity, greedy, EOS ignored) on a tiny
Mixtral (E8/k2) and a tiny Qwen3-MoE (E32/k4), with N adapters of ranks cycling 8/16/32/64 on q/k/v/o and on
``mlp.experts.gate_up_proj`` / ``down_proj`` (PEFT ``target_parameters``). Systems, fp32, same weights:

  hf-plain      transformers ``generate`` on the base model (its default experts implementation)
  peft-single   PEFT with all N adapters loaded, one ``generate`` per distinct adapter (``set_adapter``)
  peft-mixed    PEFT's own mixed batch (``adapter_names=``): PEFT 0.21 refuses it for ``target_parameters``
                adapters; the JSON records its error instead of a rate
  engine-lora   lora_serve.Engine, every request with its adapter, one mixed batch
  engine-base   the same engine and requests without adapters

    .venv/bin/python benchmarks/expert_lora_serving.py --smoke                      # seconds (CI)
    .venv/bin/python benchmarks/expert_lora_serving.py -n 10 100 --json benchmarks/results/expert_lora_serving.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from lora_serving import closed_batch, save_adapter, zipf_choice  # noqa: E402  (sibling script: the P2 harness)
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from lora_serve import Engine, EngineConfig

SYSTEMS = ("hf-plain", "peft-single", "peft-mixed", "engine-lora", "engine-base")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
RANKS = (8, 16, 32, 64)
_COMMON = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
               vocab_size=4096, max_position_embeddings=1024, tie_word_embeddings=False)
MODELS = {
    "mixtral": lambda: transformers.MixtralConfig(**_COMMON, intermediate_size=512, num_local_experts=8,
                                                  num_experts_per_tok=2),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**_COMMON, intermediate_size=512, moe_intermediate_size=128,
                                                     num_experts=32, num_experts_per_tok=4, norm_topk_prob=True,
                                                     decoder_sparse_step=1, mlp_only_layers=[]),
}


def base_model(family: str) -> torch.nn.Module:
    """A seeded tiny fp32 causal LM of ``family`` (experts initialised: transformers may leave them empty)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(MODELS[family](), dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 3:
                param.normal_(0.0, 0.02)
    return model.eval()


def write_adapters(base: torch.nn.Module, n: int, root: Path) -> list[str]:
    """N PEFT adapter directories as PEFT saves them (ranks cycling 8/16/32/64, random A, small B).

    One goes through PEFT's ``save_pretrained`` for the exact file layout (nested ``base_layer`` keys of the
    expert parameters); the others reuse its keys with their own rank (rank dimension r, or r*E on experts).
    """
    template = root / "template"
    config = LoraConfig(r=RANKS[0], lora_alpha=2 * RANKS[0], target_modules=ATTENTION, target_parameters=EXPERTS)
    get_peft_model(copy.deepcopy(base), config).save_pretrained(template)
    config_json = json.loads((template / "adapter_config.json").read_text())
    shapes = {k: tuple(v.shape) for k, v in load_file(template / "adapter_model.safetensors").items()}
    generator = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n):
        rank = RANKS[i % len(RANKS)]
        tensors = {}
        for key, shape in shapes.items():
            grow = rank / RANKS[0]  # the rank dimension holds r (attention) or r*E (experts) rows/columns
            if ".lora_A." in key:
                shape = (int(shape[0] * grow), shape[1])
                tensors[key] = torch.randn(shape, generator=generator) / shape[1] ** 0.5
            else:
                shape = (shape[0], int(shape[1] * grow))
                tensors[key] = torch.randn(shape, generator=generator) * 0.01
        paths.append(save_adapter(root / f"adapter{i}", config_json, rank, tensors))
    return paths


def decode_roofline(base: torch.nn.Module, paths: list[str], distinct: list[int]) -> float:
    """Best engine-lora / engine-base rate if decode is bound by reading weights (as P2's roof): each step
    reads every base weight (a decode batch of 32 x k touches nearly every expert) and every distinct
    adapter's A and B. At these tiny bases an adapter of rank 64 on E32 experts is half the size of the base
    itself, so this roof, not the kernels, bounds the ratio."""
    embedding = base.get_input_embeddings().weight
    tied = embedding is base.get_output_embeddings().weight
    base_params = sum(p.numel() for p in base.parameters()) - (0 if tied else embedding.numel())
    files = [Path(paths[i]) / "adapter_model.safetensors" for i in set(distinct)]
    adapter_params = sum(t.numel() for file in files for t in load_file(file).values())
    return base_params / (base_params + adapter_params)


def peft_mixed_refusal(base, paths: list[str], ctx: dict) -> str | None:
    """What PEFT says to a mixed batch of two expert-LoRA adapters (None if it ran).

    Asked of a PeftModel of its own: after refusing, PEFT 0.21 leaves its ``adapter_names`` hooks on the
    model, so every later ``generate`` of that model fails too.
    """
    peft = PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name="x0")
    peft.load_adapter(paths[1], adapter_name="x1")
    try:
        two = {**ctx, "peft": peft.eval(), "prompts": ctx["prompts"][:2], "adapters": ["x0", "x1"]}
        closed_batch("peft-mixed", two)
    except ValueError as err:
        return str(err)
    return None


def prepare(args, family: str, n: int) -> tuple[dict, dict]:
    """Model, adapters, prompts and the systems loaded and warmed up: ``(ctx, result)``."""
    rng = np.random.default_rng(0)
    base = base_model(family)
    tmp = tempfile.TemporaryDirectory()
    paths = write_adapters(base, n, Path(tmp.name))
    names = [f"a{i}" for i in range(n)]
    chosen = zipf_choice(n, args.requests, rng)
    prompts = torch.from_numpy(rng.integers(3, base.config.vocab_size, size=(args.requests, args.prompt_len)))
    ctx = {"base": base, "new_tokens": args.new_tokens, "adapters": [names[i] for i in chosen], "tmp": tmp,
           "prompts": prompts, "runs": {}}
    result = {"family": family, "adapters": n, "distinct_in_batch": len(set(chosen)), "systems": {},
              "decode_roofline_lora_over_base": decode_roofline(base, paths, chosen)}
    systems = list(args.systems)
    if {"peft-single", "peft-mixed"} & set(systems):
        start = time.perf_counter()
        peft = PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name=names[0])
        for name, path in zip(names[1:], paths[1:]):
            peft.load_adapter(path, adapter_name=name)
        result["peft_load_s"] = time.perf_counter() - start
        ctx["peft"] = peft.eval()
        if "peft-mixed" in systems:
            result["peft_mixed_error"] = peft_mixed_refusal(base, paths, ctx)
            if result["peft_mixed_error"] is not None:
                systems.remove("peft-mixed")
    if {"engine-lora", "engine-base"} & set(systems):
        config = EngineConfig(pool_mb=args.pool_mb, max_batch_size=max(64, args.requests),
                              max_batch_tokens=args.max_batch_tokens, max_resident_adapters=args.resident)
        ctx["engine"] = Engine(copy.deepcopy(base), config=config)
        start = time.perf_counter()
        for name, path in zip(names, paths):
            ctx["engine"].add_adapter(name, path)
        result["engine_load_s"] = time.perf_counter() - start
    for system in systems:  # warm-up
        closed_batch(system, {**ctx, "prompts": prompts[:2], "adapters": ctx["adapters"][:2]})
    ctx["runs"] = {system: [] for system in systems}
    return ctx, result


def summarise(args, ctx: dict, result: dict) -> dict:
    """Median tokens/s of each system's repeats and the issue's ratios."""
    total = args.requests * args.new_tokens
    for system, runs in ctx["runs"].items():
        seconds = sorted(r["seconds"] for r in runs)
        result["systems"][system] = {"tokens_per_s": total / seconds[len(seconds) // 2],
                                     "all_tokens_per_s": [total / s for s in seconds]}
    rate = {k: v["tokens_per_s"] for k, v in result["systems"].items()}
    pairs = {"engine_lora_over_engine_base": ("engine-lora", "engine-base"),
             "engine_lora_over_peft_single": ("engine-lora", "peft-single"),
             "engine_base_over_hf_plain": ("engine-base", "hf-plain")}
    result["ratios"] = {k: rate[a] / rate[b] for k, (a, b) in pairs.items() if a in rate and b in rate}
    if "engine" in ctx:
        result["pool_after"] = str(ctx["engine"].pool_stats())
    result["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["load_average_1_5_15"] = os.getloadavg()
    ctx["tmp"].cleanup()
    return result


def markdown(args, results: list[dict]) -> str:
    """The RESULTS.md section: one row per (model, N)."""
    systems = [s for s in SYSTEMS if s != "peft-mixed"]
    lines = [f"\n## Issue 19: expert-LoRA serving (fp32, CPU, {args.threads} torch thread(s))\n",
             f"`{' '.join(shlex.quote(a) for a in ['.venv/bin/python', *sys.argv])}`\n",
             f"{args.requests} requests x {args.prompt_len}-token prompts -> {args.new_tokens} new tokens, greedy; "
             "ranks 8/16/32/64 on q/k/v/o + experts gate_up/down; Zipf(1); tokens/s, median of "
             f"{args.repeats}.\n",
             "| model | N | distinct | " + " | ".join(systems) + " | lora/base (memory-bound roof) | vs peft-single "
             "| base vs hf |",
             "|---" * (len(systems) + 6) + "|"]
    for r in results:
        rate, ratio = r["systems"], r["ratios"]
        cell = lambda s: f"{rate[s]['tokens_per_s']:.1f}" if s in rate else "-"  # noqa: E731
        get = lambda k: f"{ratio[k]:.2f}x" if k in ratio else "-"  # noqa: E731
        lines.append(f"| {r['family']} | {r['adapters']} | {r['distinct_in_batch']} | "
                     + " | ".join(cell(s) for s in systems) + f" | {get('engine_lora_over_engine_base')} "
                     f"({r['decode_roofline_lora_over_base']:.2f}x) | "
                     f"{get('engine_lora_over_peft_single')} | {get('engine_base_over_hf_plain')} |")
    errors = {r.get("peft_mixed_error") for r in results} - {None}
    if errors:
        lines.append(f"\npeft-mixed: refused by PEFT ({'; '.join(sorted(errors))}).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("-n", "--num-adapters", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pool-mb", type=float, default=2048)
    parser.add_argument("--max-batch-tokens", type=int, default=2048)
    parser.add_argument("--resident", type=int, default=128, help="max adapters in the pool at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared box)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI): seconds")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.smoke:
        args.num_adapters, args.requests, args.prompt_len, args.new_tokens, args.repeats = [3], 4, 8, 3, 1
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    results = []
    for family in args.models:
        for n in args.num_adapters:
            ctx, result = prepare(args, family, n)
            for _ in range(args.repeats):  # round-robin, so load from other users hits every system alike
                for system in ctx["runs"]:
                    ctx["runs"][system].append(closed_batch(system, ctx))
            results.append(summarise(args, ctx, result))
            print(f"{family} N={n}: {results[-1]['ratios']}", flush=True)
    print(markdown(args, results))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": None}, "results": results}, indent=2,
                                        default=str))


if __name__ == "__main__":
    main()
