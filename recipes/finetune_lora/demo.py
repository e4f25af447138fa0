"""The whole path in one command: base model -> fine-tune one LoRA adapter per task -> serve them all with
lora-serve -> ask each one through the official openai client -> compare.

    python recipes/finetune_lora/demo.py                       # tiny Mixtral, 3 adapters, a few minutes on 2 cores
    python recipes/finetune_lora/demo.py --launcher accelerate --nproc 2   # each adapter on 2 processes
    python recipes/finetune_lora/demo.py --launcher deepspeed --nproc 2    # ZeRO-2

Writes under ``--out``: ``base/`` (tiny bases), ``adapters/<task>/`` (PEFT directories with
``train_metrics.json``), ``eval_table.md``, ``training_curves.png`` and ``summary.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import openai

from lora_serve.testing import free_port, serve_in_subprocess

import finetune
import report
import tasks
from base import TINY, save_base

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/finetune_lora_demo"))
    p.add_argument("--base", default="tiny-mixtral", help="tiny-mixtral | tiny-llama | smollm2 | HF dir | .gguf")
    p.add_argument("--tasks", default="upper,novowels,backwards", help=f"comma-separated, from {sorted(tasks.TASKS)}")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps per adapter")
    p.add_argument("--text", default=None, help="file of prose lines (default: the standard library's docstrings)")
    p.add_argument("--launcher", default="none",
                   help="none (train in this process: fastest on a small CPU), accelerate or deepspeed; a "
                        "comma-separated list is used in turn, one launcher per adapter")
    p.add_argument("--nproc", type=int, default=2, help="processes per adapter with --launcher")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per served completion")
    p.add_argument("--finetune-args", default="", help="extra finetune.py options, e.g. '--compress-activations'")
    args = p.parse_args(argv)
    args.tasks, args.launcher = args.tasks.split(","), args.launcher.split(",")
    bad = sorted(set(args.launcher) - {"none", "accelerate", "deepspeed"})
    if bad:
        p.error(f"--launcher {bad}: expected none, accelerate or deepspeed")
    for name in args.tasks:
        tasks.task(name)  # a clear error for an unknown task before anything runs
    return args


def launch_command(launcher: str, nproc: int) -> list[str]:
    """The launcher prefix that runs finetune.py on ``nproc`` processes."""
    script, port = str(HERE / "finetune.py"), str(free_port())  # a free port: 29500 may be taken
    if launcher == "accelerate":  # `--cpu --num_processes N` would silently start one process
        return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(nproc),
                "--main_process_port", port, script]
    return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", port, script,
            "--deepspeed_config", str(HERE / "ds_config.json")]


def train_adapters(args: argparse.Namespace, base: str) -> dict[str, Path]:
    """Fine-tune one adapter per task, one after another; returns ``{task: adapter dir}``."""
    adapters = {}
    for i, name in enumerate(args.tasks):
        launcher = args.launcher[i % len(args.launcher)]
        out = args.out / "adapters" / name
        options = ["--base", base, "--task", name, "--out", str(out), "--steps", str(args.steps),
                   *(["--text", args.text] if args.text else []), *args.finetune_args.split()]
        if launcher == "none":
            finetune.main(options)
        else:
            subprocess.run([*launch_command(launcher, args.nproc), *options], check=True)
        adapters[name] = out
    return adapters


@contextlib.contextmanager
def lora_serve(base: str, adapters: dict[str, Path], timeout: float = 180):
    """Run ``lora-serve`` with the base (served as ``base``) and every adapter; yields its URL.

    The server is stopped on exit, also after an error or Ctrl-C: nothing is left running.
    """
    args = ["--model", base, "--served-model-name", "base", "--log-level", "warning",
            *[f"--adapter={name}={path}" for name, path in adapters.items()]]
    print("$ python -m lora_serve", " ".join(args))
    with serve_in_subprocess(args, timeout=timeout) as server:
        yield server.url


def query(url: str, models: list[str], prompts: dict[str, str], max_tokens: int) -> dict[str, dict[str, str]]:
    """Greedy completion of every prompt by every served model: ``{model: {prompt name: text}}``."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    served = [card.id for card in client.models.list()]
    missing = sorted(set(models) - set(served))
    if missing:
        raise RuntimeError(f"lora-serve does not serve {missing} (it serves {served})")
    return {model: {name: client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                                    temperature=0).choices[0].text
                    for name, prompt in prompts.items()}
            for model in models}


def main(argv: list[str] | None = None) -> dict:
    """Run the path and print what each step produced; returns the summary it writes."""
    args = parse_args(argv)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    base = str(save_base(args.base, args.out / "base")) if args.base in TINY else args.base
    if base == "smollm2":
        from lora_serve.cli import default_model

        base = default_model() or base  # load_base explains what is missing
    print(f"== 1. base model: {base}")
    print(f"== 2. fine-tune {len(args.tasks)} adapters ({', '.join(args.launcher)} launcher). Multi-process CPU runs of one:")
    for launcher in ("accelerate", "deepspeed"):
        print("   ", " ".join(launch_command(launcher, 2)), "--base", base, "--task", args.tasks[0], "--out DIR")
    adapters = train_adapters(args, base)
    trained = time.perf_counter()

    _, held_out = tasks.split(tasks.load_sentences(args.text))
    prompts = {name: tasks.prompt_of(tasks.task(name)(held_out[0])) for name in ["plain", *args.tasks]}
    print("== 3. serve the base and all adapters from one lora-serve process; query each with the openai client")
    with lora_serve(base, adapters) as url:
        answers = query(url, ["base", *args.tasks], prompts, args.max_tokens)
    for prompt_name, prompt in prompts.items():
        print(f"\nprompt ({prompt_name}): {prompt!r}")
        for model, texts in answers.items():
            print(f"  {model:>10}: {texts[prompt_name]!r}")

    print("\n== 4. held-out loss of every model on every task (PEFT applies each adapter; lower is better)")
    losses = report.loss_matrix(base, adapters, ["plain", *args.tasks], args.text)
    samples = {model: answers[model]["plain" if model == "base" else model] for model in answers}
    table = report.markdown_table(losses, samples)
    print(table)
    wins = {name: losses[name][name] < min(losses[m][name] for m in losses if m != name) for name in args.tasks}
    for name, won in wins.items():
        print(f"adapter {name}: {'best' if won else 'NOT best'} on its own task "
              f"({losses[name][name]:.3f} vs base {losses['base'][name]:.3f})")
    metrics = report.read_metrics(adapters)
    (args.out / "eval_table.md").write_text(
        "Held-out loss per token (rows: served model, columns: task); sample: greedy completion of the "
        "model's own task prompt (base: plain).\n\n" + table + "\n")
    report.plot_curves(metrics, args.out / "training_curves.png")
    summary = {"base": base, "adapters": {k: str(v) for k, v in adapters.items()}, "losses": losses,
               "answers": answers, "prompts": prompts, "own_task_best": wins,
               "train_seconds": trained - start, "total_seconds": time.perf_counter() - start}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {args.out}/eval_table.md, training_curves.png, summary.json "
          f"({summary['total_seconds']:.0f} s in all, {summary['train_seconds']:.0f} s training)")
    return summary


if __name__ == "__main__":
    main()
