"""Fine-tune while serving (issue 21): inference SLOs and training throughput with one engine doing both.

One tiny Llama (``lora_serving.base_model("tiny")``, fp32, CPU), 4 served LoRA adapters, and an open-loop
trace: Poisson arrivals, uniform prompt/output lengths, Zipf(1) adapters (``lora_serving.make_trace``),
replayed in real time against ``lora_serve.Engine`` (arrivals are submitted between steps, as the engine
process takes commands between steps). Scenarios, in one process on the same weights and trace:

  inference-alone   the trace, no job
  training-alone    a LoRA job (``FineTuner``) on an idle engine for the trace's duration
  co-served         the trace with the job running, the FineTuner given the SLO targets
  co-served-no-slo  the same without SLO targets (only the step's token budget limits training)

SLO: a request meets it when its TTFT and its mean inter-token latency are within the targets, which come
from the first inference-alone run (``--slo-factor`` x its p90s, default 3; a load spike in that one run
makes them lax, so the recorded run gives them as ``--slo-ttft`` / ``--slo-itl``), so the targets scale with the
machine (absolute times on a shared 2-core box are noise); the question is how much training costs the
attainment. The four scenarios run in rounds (``--repeats``, default 3): medians, each run in the JSON.
``busy_fraction``: share of the run spent in steps that served requests. Training tokens/s = tokens the job
ran (padded micro-batches, forward + backward) / s.

    .venv/bin/python benchmarks/fine_tune_while_serving.py --smoke
    .venv/bin/python benchmarks/fine_tune_while_serving.py --json benchmarks/results/fine_tune_while_serving.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from lora_serving import base_model, make_trace, write_adapters  # noqa: E402  (sibling script: the P2 harness)

from lora_serve import Engine, EngineConfig, SamplingParams
from lora_serve.fine_tuning import FineTuner, FineTuningConfig, FineTuningService
from lora_serve.testing import char_tokenizer


def training_file(n: int, length: int, rng: np.random.Generator) -> bytes:
    """``n`` prompt/completion examples of about ``length`` characters (= tokens with the char tokenizer)."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz "))
    lines = []
    for _ in range(n):
        text = "".join(rng.choice(letters, size=length))
        lines.append(json.dumps({"prompt": text[: length // 2], "completion": text[length // 2 :].upper()}))
    return ("\n".join(lines) + "\n").encode()


def replay(engine: Engine, trace: list[dict], seconds: float) -> dict:
    """Replay ``trace`` in real time (stepping until it is done, at least ``seconds``); per-request TTFT and ITL."""
    pending, arrival, last, first, gaps = list(trace), {}, {}, {}, {}
    busy = 0.0  # seconds of steps that served requests
    start = time.perf_counter()
    while pending or engine.has_unfinished() or time.perf_counter() - start < seconds:
        now = time.perf_counter() - start
        while pending and pending[0]["at"] <= now:
            item = pending.pop(0)
            params = SamplingParams(max_tokens=item["max_tokens"], temperature=0, ignore_eos=True)
            arrival[engine.submit(item["prompt"], params, item["adapter"])] = item["at"]
        if not engine.wants_step():
            time.sleep(max(0.0, min(pending[0]["at"] if pending else seconds, seconds) - now))
            continue
        serving = engine.has_unfinished()
        step_start = time.perf_counter()
        outputs = engine.step()
        busy += (time.perf_counter() - step_start) if serving else 0.0
        for out in outputs:
            t = time.perf_counter() - start
            rid = out.request_id
            if rid not in first:
                first[rid] = t - arrival[rid]
            else:
                gaps.setdefault(rid, []).append(t - last[rid])
            last[rid] = t
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "busy_fraction": busy / seconds, "ttft": first,
            "itl": {rid: float(np.mean(g)) for rid, g in gaps.items()}}


def summarize(run: dict, ttft_slo: float, itl_slo: float) -> dict:
    """p50/p90 of TTFT and ITL and the share of requests meeting both targets."""
    ttft, itl = run["ttft"], run["itl"]
    met = [ttft[r] <= ttft_slo and itl.get(r, 0.0) <= itl_slo for r in ttft]
    return {"requests": len(ttft), "ttft_p50": float(np.percentile(list(ttft.values()), 50)),
            "ttft_p90": float(np.percentile(list(ttft.values()), 90)),
            "itl_p50": float(np.percentile(list(itl.values()), 50)),
            "itl_p90": float(np.percentile(list(itl.values()), 90)),
            "slo_attainment": float(np.mean(met))}


def build(args, base, adapters: dict[str, str], root: Path | None, slo: tuple[float, float] | None):
    """An engine with the adapters and, with ``root``, a FineTuner and one long job (cancelled at the end)."""
    engine = Engine(copy.deepcopy(base), char_tokenizer(base.config.vocab_size),
                    EngineConfig(pool_mb=256, max_batch_tokens=args.max_batch_tokens))
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    if root is None:
        return engine, None
    config = FineTuningConfig(root=root, slo_ttft_s=slo and slo[0], slo_itl_s=slo and slo[1],
                              checkpoint_every=10**6)
    engine.attach_background(FineTuner(engine, config))
    service = FineTuningService(engine, config, "base")
    rng = np.random.default_rng(1)
    file_id = service.files.add("t.jsonl", training_file(64, args.train_len, rng), "fine-tune").id
    service.create_job("base", file_id, None, None, 0, {"n_epochs": 50, "batch_size": args.train_batch,
                                                        "learning_rate_multiplier": 1.0},
                       {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    while engine.background.current is None:  # validate and start the job before the clock starts
        engine.step()
    return engine, engine.background


def run_scenario(args, base, adapters, trace, name: str, slo) -> dict:
    """One scenario: its inference summary (if it serves) and its training tokens/s (if it trains)."""
    root = Path(tempfile.mkdtemp(prefix=f"ft-bench-{name}-")) if name != "inference-alone" else None
    engine, tuner = build(args, base, adapters, root, slo if name == "co-served" else None)
    tokens_before = tuner.current[1].trained_tokens if tuner else 0
    run = replay(engine, [] if name == "training-alone" else trace, trace[-1]["at"] + 1.0)
    result = {"seconds": run["seconds"], "busy_fraction": run["busy_fraction"]}
    if tuner is not None:
        trainer = tuner.current[1]
        result["train_tokens_per_s"] = (trainer.trained_tokens - tokens_before) / run["seconds"]
        result["optimizer_steps"] = trainer.step
        result["training_stats"] = dict(tuner.stats)  # micro-batches, tokens, seconds while idle / busy
    result["runs"] = run
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=1.0, help="requests per second (Poisson)")
    p.add_argument("--trace-requests", type=int, default=30)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--max-batch-tokens", type=int, default=512)
    p.add_argument("--train-len", type=int, default=32, help="characters (tokens) per training example")
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--slo-factor", type=float, default=3.0, help="SLO targets = factor x inference-alone p90")
    p.add_argument("--slo-ttft", type=float, help="TTFT target in seconds (instead of the factor)")
    p.add_argument("--slo-itl", type=float, help="ITL target in seconds (instead of the factor)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of all four scenarios (medians reported)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="a few requests, seconds")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.smoke:
        args.trace_requests, args.rate, args.repeats = 6, 6.0, 1
    torch.set_num_threads(args.threads)
    base = base_model("tiny")
    rng = np.random.default_rng(0)
    names = ("inference-alone", "training-alone", "co-served", "co-served-no-slo")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    slo = (args.slo_ttft, args.slo_itl) if args.slo_ttft and args.slo_itl else None
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_adapters(base, 4, Path(tmp))
        adapters = {f"a{i}": path for i, path in enumerate(paths)}
        trace = make_trace(args, 4, list(adapters), base.config.vocab_size, rng)
        for _ in range(args.repeats):  # rounds of all scenarios: the machine's load drifts between rounds
            for name in names:
                runs[name].append(run_scenario(args, base, adapters, trace, name, slo))
                if slo is None:  # the targets come from the first inference-alone run
                    alone = summarize(runs[name][0]["runs"], float("inf"), float("inf"))
                    slo = (args.slo_factor * alone["ttft_p90"], args.slo_factor * alone["itl_p90"])
    rows = {}
    for name, results in runs.items():
        per_run = [{k: v for k, v in r.items() if k != "runs"} | ({} if name == "training-alone" else
                   summarize(r["runs"], *slo)) for r in results]
        numbers = [k for k, v in per_run[0].items() if isinstance(v, (int, float))]
        rows[name] = {k: float(np.median([r[k] for r in per_run])) for k in numbers} | {"repeats": per_run}
    alone_train = rows["training-alone"]["train_tokens_per_s"]
    for name in ("co-served", "co-served-no-slo"):
        rows[name]["train_vs_alone"] = rows[name]["train_tokens_per_s"] / alone_train
        rows[name]["slo_points_vs_inference_alone"] = 100 * (rows[name]["slo_attainment"]
                                                             - rows["inference-alone"]["slo_attainment"])
    summary = {"command": "benchmarks/fine_tune_while_serving.py " + shlex.join(sys.argv[1:]), "args": vars(args)
               | {"json": str(args.json)}, "slo_ttft_s": slo[0], "slo_itl_s": slo[1], "scenarios": rows,
               "load_average_1_5_15": os.getloadavg(), "cpus": os.cpu_count(), "torch_threads": args.threads}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
