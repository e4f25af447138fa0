"""Issue 24: lora-serve's throughput over HTTP vs its own engine in-process and vs PEFT, closed batches.

Systems, same weights, 30 adapters (ranks 8/16/32/64 on q/k/v/o), engine options and requests:
  http          ``python -m lora_serve`` (engine in its own process, the default) on 127.0.0.1; the batch's
                requests are sent at once through the official ``openai`` AsyncOpenAI client
  http-all-cores  the same with ``--engine-threads`` = every core (the default leaves one to the HTTP process)
  http-thread   the same server with ``--engine-thread`` (the engine stepping in a thread of the server
                process, as before issue 24): what the engine process buys
  in-process    ``lora_serve.Engine.generate`` of the same batch in this process: the goal (>= 0.9x)
  peft-mixed    PEFT with every adapter loaded, one ``generate(adapter_names=...)`` of the batch: what a user
                would run instead (goal on SmolLM2: http >= 2x)
Closed batch: C requests submitted at once (C = --concurrency, each value in turn), P-token prompts of
random token ids, G new tokens each, greedy with EOS ignored, so every system makes C*G tokens; adapters
Zipf(1) over the N. Each HTTP system runs streamed (SSE) and not. Throughput = C*G / (last answer - first
send), median of --repeats, the systems round-robin with the first one rotating (load from other users of
the machine hits each alike). Torch threads: the default unless --threads (the issue asks for default threads).

    .venv/bin/python benchmarks/serve_http_closed.py --smoke                   # seconds, CI
    .venv/bin/python benchmarks/serve_http_closed.py --model tiny              # 32/64/256, ~5 min idle
    .venv/bin/python benchmarks/serve_http_closed.py --model smollm2 --json benchmarks/results/serve_http_closed_smollm2.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import torch

from peft import PeftModel

from lora_serve import Engine, EngineConfig, SamplingParams
from lora_serve.model_loading import load_base_model
from lora_serve.server.adapters import find_adapters
from lora_serve.testing import stop_server_process

# Sibling benchmark scripts (this folder is on sys.path when run as a script).
from lora_serving import _hf_generate, zipf_choice
from serve_http import engine_options, prepare_model, start_server

# "http" keeps lora-serve's default --engine-threads (cores - 1: one core left to the HTTP process);
# "http-all-cores" gives the engine process every core, as the in-process baseline has: what that default buys.
SERVERS = {"http": [], "http-all-cores": ["--engine-threads", str(len(os.sched_getaffinity(0)))],
           "http-thread": ["--engine-thread"]}


def make_batch(args, names: list[str], vocab: int, concurrency: int, seed: int) -> tuple[list[list[int]], list[str]]:
    """``concurrency`` prompts of ``--prompt-len`` random token ids and their Zipf(1) adapters."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(3, vocab, size=(concurrency, args.prompt_len)).tolist()
    return prompts, [names[i] for i in zipf_choice(len(names), concurrency, rng)]


async def http_batch(client: openai.AsyncOpenAI, prompts, adapters, new_tokens: int, stream: bool) -> int:
    """Send every request at once; return the output tokens the server reported."""
    async def one(prompt, adapter) -> int:
        common = dict(model=adapter, prompt=prompt, max_tokens=new_tokens, temperature=0,
                      extra_body={"ignore_eos": True})
        if not stream:
            return (await client.completions.create(**common)).usage.completion_tokens
        chunks = await client.completions.create(**common, stream=True, stream_options={"include_usage": True})
        tokens = 0
        async for chunk in chunks:  # the last chunk has no choices, only the usage
            tokens = chunk.usage.completion_tokens if chunk.usage else tokens
        return tokens

    return sum(await asyncio.gather(*(one(p, a) for p, a in zip(prompts, adapters))))


def timed(run) -> tuple[float, int]:
    """``run()`` -> tokens; returns (seconds, tokens)."""
    start = time.perf_counter()
    tokens = run()
    return time.perf_counter() - start, tokens


def make_systems(args, servers: dict, engine: Engine, peft, loop: asyncio.AbstractEventLoop) -> dict:
    """name -> function(prompts, adapters) running one closed batch and returning its output tokens
    (the HTTP clients run on ``loop``)."""
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    systems = {}
    for name, server in servers.items():
        most = max(args.concurrency) + 8
        limits = httpx.Limits(max_connections=most, max_keepalive_connections=most)
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=args.timeout,
                                    http_client=httpx.AsyncClient(limits=limits, timeout=args.timeout))
        for stream in args.stream:
            systems[f"{name}{'-sse' if stream else ''}"] = (
                lambda p, a, c=client, s=stream: loop.run_until_complete(http_batch(c, p, a, args.new_tokens, s)))
    systems["in-process"] = lambda p, a: sum(len(c.token_ids) for c in engine.generate(p, params, a))
    if peft is not None:
        def peft_mixed(prompts, adapters) -> int:
            _hf_generate(peft, torch.tensor(prompts), args.new_tokens, adapter_names=adapters)
            return len(prompts) * args.new_tokens  # min_new_tokens = max_new_tokens: exactly G each

        systems["peft-mixed"] = peft_mixed
    return systems


def run(args, systems: dict, names: list[str], vocab: int) -> list[dict]:
    """Every concurrency: warm up each system, then ``--repeats`` round-robin runs; medians and ratios."""
    results = []
    for i, concurrency in enumerate(args.concurrency):
        prompts, adapters = make_batch(args, names, vocab, concurrency, seed=i)
        for run_batch in systems.values():  # warm-up (and the adapters' first copies into the pools)
            run_batch(prompts, adapters)
        runs = {name: [] for name in systems}
        order = list(systems)
        for repeat in range(args.repeats):
            for name in order[repeat % len(order):] + order[: repeat % len(order)]:
                seconds, tokens = timed(lambda: systems[name](prompts, adapters))
                if tokens != concurrency * args.new_tokens:
                    sys.exit(f"{name}: {tokens} tokens, expected {concurrency * args.new_tokens}")
                runs[name].append(tokens / seconds)
                print(f"C={concurrency} {name:>16} #{repeat}: {tokens / seconds:.1f} tok/s", flush=True)
        tok_s = {name: statistics.median(r) for name, r in runs.items()}
        ratios = {f"{name}/in-process": tok_s[name] / tok_s["in-process"] for name in tok_s if name.startswith("http")}
        if "peft-mixed" in tok_s:
            ratios |= {f"{name}/peft-mixed": tok_s[name] / tok_s["peft-mixed"] for name in tok_s if name.startswith("http")}
        results.append({"concurrency": concurrency, "distinct_adapters": len(set(adapters)), "tokens_per_s": tok_s,
                        "ratios": ratios, "runs": runs, "load_average_1_5_15": os.getloadavg()})
    return results


def guidellm(args, url: str, tokenizer_dir: Path, concurrency: int, out: Path) -> dict:
    """guidellm as a client we did not write: ``concurrency`` concurrent SSE streams of ``/v1/completions``,
    ``concurrency * --repeats`` requests, synthetic prompts of ``--prompt-len`` tokens, ``--new-tokens`` out.

    guidellm sends one model name, so every request goes to ``adapter0`` (the most popular under Zipf).
    It runs from its own environment (``--guidellm PATH``): it pins click~=8.4, this project click 8.5.
    """
    command = [args.guidellm, "run", "--backend", f"kind=openai_http,target={url},model=adapter0,"
               "request_format=/v1/completions", "--profile", f"kind=concurrent,streams={concurrency}",
               "--constraint", f"kind=max_requests,count={concurrency * args.repeats}",
               "--tokenizer", f"kind=hf_auto,model={tokenizer_dir}",
               "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_len},output_tokens={args.new_tokens}",
               "--output", f"kind=json,path={out}", "--disable-console-interactive"]
    done = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=args.timeout)
    if done.returncode != 0:
        sys.exit(f"guidellm failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    metrics = json.loads(out.read_text())["benchmarks"][0]["metrics"]
    ok = {k: metrics[k]["successful"] for k in ("output_tokens_per_second", "time_to_first_token_ms",
                                                 "inter_token_latency_ms", "output_token_count")}
    return {"output_tokens_per_s": ok["output_tokens_per_second"]["mean"],
            "requests": metrics["request_totals"]["successful"], "errors": metrics["request_totals"]["errored"],
            "output_tokens_mean": ok["output_token_count"]["mean"],
            **{f"{name}_ms_p{q}": ok[f"{key}_ms"]["percentiles"][f"p{q}"]
               for name, key in (("ttft", "time_to_first_token"), ("itl", "inter_token_latency")) for q in (50, 99)}}


def markdown(args, results: list[dict]) -> str:
    """One row per concurrency: each system's tok/s, then the ratios."""
    names = list(results[0]["tokens_per_s"])
    ratio_names = list(results[0]["ratios"])
    lines = ["| C | distinct adapters | " + " | ".join(names) + " | " + " | ".join(ratio_names) + " | load avg (1 min) |",
             "|---" * (len(names) + len(ratio_names) + 3) + "|"]
    for r in results:
        lines.append(f"| {r['concurrency']} | {r['distinct_adapters']} | "
                     + " | ".join(f"{r['tokens_per_s'][n]:.1f}" for n in names) + " | "
                     + " | ".join(f"{r['ratios'][n]:.2f}x" for n in ratio_names)
                     + f" | {r['load_average_1_5_15'][0]:.1f} |")
    if any("guidellm" in r for r in results):
        lines += ["", "| C | guidellm -> http: output tok/s | / in-process | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) "
                  "| requests | errors |", "|---|---|---|---|---|---|---|"]
        for r in results:
            g = r["guidellm"]
            lines.append(f"| {r['concurrency']} | {g['output_tokens_per_s']:.1f} | "
                         f"{g['output_tokens_per_s'] / r['tokens_per_s']['in-process']:.2f}x | {g['ttft_ms_p50']:.1f} / "
                         f"{g['ttft_ms_p99']:.1f} | {g['itl_ms_p50']:.1f} / {g['itl_ms_p99']:.1f} | {g['requests']} | "
                         f"{g['errors']} |")
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("-n", "--num-adapters", type=int, default=30)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32, 64, 256])
    parser.add_argument("--stream", type=int, nargs="+", choices=(0, 1), default=[0, 1],
                        help="1: SSE streams, 0: whole answers (default: both)")
    parser.add_argument("--systems", nargs="+", default=["http", "http-all-cores", "http-thread", "peft-mixed"],
                        help="from http, http-all-cores, http-thread, peft-mixed (in-process always runs: it is the baseline)")
    parser.add_argument("--prompt-len", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--pool-mb", type=float, default=1536)
    parser.add_argument("--max-batch-tokens", type=int, default=2048)
    parser.add_argument("--resident", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--guidellm", metavar="PATH", help="the guidellm executable (its own venv) to run against "
                        "the http server at each concurrency too (default: skipped)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 4 adapters, C=4 and 8, 4 tokens, 1 repeat")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "serve_http_closed.json")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.num_adapters, args.concurrency, args.repeats, args.new_tokens = "tiny", 4, [4, 8], 1, 4
    args.max_batch_size = max(args.concurrency)  # every request of a batch runs at once (engine_options)
    return args


def main() -> None:
    args = parse_args()
    torch.set_grad_enabled(False)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, names, vocab = prepare_model(args, Path(tmp))
        servers = {}
        try:
            for name, flags in SERVERS.items():
                if name in args.systems:
                    log = open(Path(tmp) / f"{name}.log", "w+")
                    servers[name] = start_server(args, model, Path(tmp) / "adapters", log, extra=flags)
            engine = Engine(model, config=EngineConfig(**engine_options(args)))
            for name, path in find_adapters(Path(tmp) / "adapters").items():
                engine.add_adapter(name, path)
            peft = load_peft(model, Path(tmp) / "adapters", names) if "peft-mixed" in args.systems else None
            loop = asyncio.new_event_loop()
            try:
                results = run(args, make_systems(args, servers, engine, peft, loop), names, vocab)
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()
            if args.guidellm and "http" in servers:
                engine.tokenizer.save_pretrained(Path(tmp) / "tokenizer")  # guidellm counts tokens with it
                for row in results:
                    row["guidellm"] = guidellm(args, servers["http"].url, Path(tmp) / "tokenizer",
                                               row["concurrency"], Path(tmp) / f"guidellm_{row['concurrency']}.json")
                    print(f"C={row['concurrency']} guidellm -> http: {row['guidellm']}", flush=True)
        finally:
            for server in servers.values():
                stop_server_process(server.process)
    write(args, results)


def load_peft(model: str, root: Path, names: list[str]):
    """PEFT over its own copy of the served base model, with every adapter loaded under its served name."""
    base = load_base_model(model, torch.float32)[0].eval()
    peft = PeftModel.from_pretrained(base, str(root / names[0]), adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(str(root / name), adapter_name=name)
    return peft.eval()


def write(args, results: list[dict]) -> None:
    table = markdown(args, results)
    print(table)
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": command, "args": vars(args) | {"json": str(args.json)},
                                     "results": results, "table": table}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
