"""`make demo`: patch a tiny Mixtral-style model, train it briefly, show loss, expert loads and speed.

Everything is built locally: the model from a config, the training text from Python's own
standard-library sources (present on every machine), tokenised as bytes.

    python -m moeplug.demo [--steps 40] [--balance micro]
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import string
import textwrap
import time

import torch
import transformers
from tqdm import tqdm

import moeplug


def byte_corpus() -> torch.Tensor:
    """A few hundred KB of Python source from the standard library, as byte ids."""
    text = "".join(inspect.getsource(module) for module in (textwrap, string, json.decoder, json.encoder, inspect))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def demo_model(seed: int = 0) -> transformers.MixtralForCausalLM:
    """A 4-layer, 8-expert top-2 Mixtral over a byte vocabulary (about 1.4M parameters)."""
    config = transformers.MixtralConfig(
        vocab_size=256, hidden_size=128, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
        router_aux_loss_coef=0.01, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    return transformers.MixtralForCausalLM(config)


def batches(corpus: torch.Tensor, batch: int, length: int, seed: int):
    """Endless random windows of the corpus."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(corpus) - length, (batch,), generator=generator)
        yield torch.stack([corpus[s : s + length] for s in starts.tolist()])


def step_seconds(model, ids: torch.Tensor, repeats: int = 3) -> float:
    """Median seconds of one forward + backward on `ids`."""
    times = []
    for _ in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def load_table(model) -> str:
    """Per-layer tokens per expert, max/mean load and balancing loss of the last forward."""
    lines = []
    for name, stats in moeplug.router_stats(model).items():
        loads = " ".join(f"{int(c):5d}" for c in stats.tokens_per_expert)
        lbl = "-" if stats.lbl is None else f"{stats.lbl:.3f}"
        lines.append(f"{name:<24} {loads}   max/mean {stats.max_over_mean:4.2f}  lbl {lbl}")
    header = f"{'layer':<24} " + " ".join(f"{'e' + str(i):>5}" for i in range(len(stats.tokens_per_expert)))
    return "\n".join([header, *lines])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="moeplug demo: patch, train, inspect, compare speed")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--balance", default="micro", help="hf | micro | sequence | none")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    corpus = byte_corpus()
    model = demo_model(args.seed).train()
    report = moeplug.patch_model(model, balance=args.balance, z_loss_coef=1e-3)
    print(report)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    data = batches(corpus, args.batch, args.length, args.seed)
    progress = tqdm(range(args.steps), desc="training", unit="step")
    first_loss = None
    for _ in progress:
        ids = next(data)
        out = model(ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        first_loss = first_loss if first_loss is not None else out.loss.item()
        progress.set_postfix(loss=f"{out.loss.item():.3f}", aux=f"{out.aux_loss.item():.3f}")
    print(f"\nloss {first_loss:.3f} -> {out.loss.item():.3f} over {args.steps} steps "
          f"({args.batch}x{args.length} byte tokens per step)\n")
    print("expert load in the last step (tokens per expert, per layer):")
    print(load_table(model))

    ids = next(data)
    ours = step_seconds(model, ids)
    moeplug.unpatch_model(model)
    print("\nforward+backward of the whole model on one batch:")
    print(f"  moeplug experts          {ours * 1e3:8.1f} ms")
    for impl in ("grouped_mm", "eager"):
        model.set_experts_implementation(impl)
        theirs = step_seconds(model, ids)
        print(f"  transformers {impl:<11} {theirs * 1e3:8.1f} ms  ({theirs / ours:.2f}x moeplug's time)")


if __name__ == "__main__":
    main()
