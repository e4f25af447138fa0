"""P6: micro-batch vs global-batch load balancing on a two-domain corpus (English prose + Python).

Trains the same small Mixtral-style byte-level LM twice (same seed, data order, steps, tokens),
once with `balance="micro"` and once with `balance="global"` (both per layer, via moeplug), where
each micro-batch holds one domain, so micro-batch balancing forces every domain's tokens to spread
over all experts while global balancing only asks the whole step to be balanced. Reports held-out
loss per domain, per-layer Jensen-Shannon divergence (bits) between the domains' expert-usage
distributions (specialisation), per-layer max/mean load, and a PNG of the curves.

    .venv/bin/python benchmarks/global_balance.py --abstracts ../shared/data/abstracts.txt
    .venv/bin/python benchmarks/global_balance.py --abstracts ... --steps 5 --smoke   # seconds
Runs already saved in --out are re-read for the report, so the two runs may be separate processes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

import moeplug
from moeplug import BalanceController


def _python_sources(limit_bytes: int) -> bytes:
    """Standard-library Python source, present on every machine."""
    chunks, size = [], 0
    for path in sorted(Path(json.__file__).resolve().parents[1].glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= limit_bytes:
            break
    return b"\n".join(chunks)


def load_domains(abstracts: Path, limit_bytes: int = 550_000) -> dict[str, torch.Tensor]:
    """Two byte-level corpora: 'english' (abstracts) and 'python' (stdlib source), equal size."""
    english = abstracts.read_bytes()[:limit_bytes]
    python = _python_sources(len(english))[: len(english)]
    return {name: torch.tensor(list(data), dtype=torch.long) for name, data in (("english", english), ("python", python))}


def split(corpus: torch.Tensor, held_out: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    cut = int(len(corpus) * (1 - held_out))
    return corpus[:cut], corpus[cut:]


def split_domains(abstracts: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(train, held-out) byte corpora per domain; exits with a clear message if `abstracts` is missing."""
    if not abstracts.exists():
        sys.exit(f"abstracts file {abstracts} not found: pass --abstracts PATH (shared/data/abstracts.txt)")
    train_data, held_out = {}, {}
    for name, corpus in load_domains(abstracts).items():
        train_data[name], held_out[name] = split(corpus)
    return train_data, held_out


def add_training_args(parser: argparse.ArgumentParser, **defaults) -> None:
    """The corpus, model and optimiser options that `make_model` and the training loops read.

    `defaults` overrides the defaults below by option name (e.g. steps=400, layers=6).
    """
    options = {"steps": 150, "micro_batches": 4, "batch": 4, "length": 256, "layers": 4, "hidden": 128,
               "expert_width": 128, "experts": 16, "coef": 0.05, "lr": 2e-3, "seed": 0, **defaults}
    parser.add_argument("--abstracts", type=Path, default=Path("../shared/data/abstracts.txt"))
    for name, default in options.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)


def windows(corpus: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(corpus) - length, (batch,), generator=generator)
    return torch.stack([corpus[s : s + length] for s in starts.tolist()])


def make_model(args, balance: str) -> transformers.MixtralForCausalLM:
    config = transformers.MixtralConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=args.expert_width, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=4, num_local_experts=args.experts, num_experts_per_tok=2,
        max_position_embeddings=args.length, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(args.seed)
    model = transformers.MixtralForCausalLM(config).train()
    moeplug.patch_model(model, balance=balance, aux_loss_coef=args.coef)
    return model


def js_bits(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence in bits between two distributions over experts."""
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a, b):
        mask = a > 0
        return float((a[mask] * (a[mask] / b[mask]).log2()).sum())
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@torch.no_grad()
def evaluate(model, held_out: dict[str, torch.Tensor], args) -> dict:
    """Held-out loss per domain, per-layer JS between domains' expert usage, per-layer max/mean."""
    model.eval()
    generator = torch.Generator().manual_seed(1234)
    losses, usage = {}, {}
    for name, corpus in held_out.items():
        total, counts = 0.0, None
        for _ in range(args.eval_batches):
            ids = windows(corpus, args.batch, args.length, generator)
            total += model(ids, labels=ids).loss.item()
            layer_counts = torch.stack([s.tokens_per_expert.float() for s in moeplug.router_stats(model).values()])
            counts = layer_counts if counts is None else counts + layer_counts
        losses[name] = total / args.eval_batches
        usage[name] = counts
    english, python = usage["english"], usage["python"]
    both = english + python
    model.train()
    return {
        "loss": losses,
        "js_bits_per_layer": [js_bits(english[i], python[i]) for i in range(len(both))],
        "max_over_mean_per_layer": [float(c.max() / c.mean()) for c in both],
        "dead_experts_per_layer": [int((c == 0).sum()) for c in both],
    }


def train(args, balance: str, train_data: dict[str, torch.Tensor], held_out: dict[str, torch.Tensor]) -> dict:
    model = make_model(args, balance)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    BalanceController(model, optimizer)
    generator = torch.Generator().manual_seed(args.seed)
    domains = list(train_data)
    curve, start = [], time.perf_counter()
    for step in tqdm(range(args.steps), desc=f"balance={balance}", unit="step"):
        step_loss = 0.0
        for micro in range(args.micro_batches):  # each micro-batch holds one domain, alternating
            ids = windows(train_data[domains[micro % len(domains)]], args.batch, args.length, generator)
            loss = model(ids, labels=ids).loss / args.micro_batches
            loss.backward()
            step_loss += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append(step_loss)
    result = evaluate(model, held_out, args)
    result.update(balance=balance, train_curve=curve, seconds=time.perf_counter() - start)
    return result


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, js) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        curves.plot(r["train_curve"], label=f"balance={r['balance']}")
        js.plot(r["js_bits_per_layer"], marker="o", label=f"balance={r['balance']}")
    curves.set(xlabel="optimizer step", ylabel="train loss (nats/byte, incl. aux)", title="training")
    js.set(xlabel="layer", ylabel="JS divergence (bits)", title="expert specialisation: English vs Python")
    for ax in (curves, js):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--balances", nargs="+", default=["micro", "global"], choices=["micro", "global"],
                        help="which runs to do (run them as separate processes to use several cores)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, for CI")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "global_balance")
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.hidden, args.expert_width, args.experts, args.length, args.eval_batches = 2, 32, 32, 4, 32, 1
    train_data, held_out = split_domains(args.abstracts)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for balance in args.balances:  # each run is saved as soon as it ends: nothing lost if a later one dies
        results.append(train(args, balance, train_data, held_out))
        (args.out / f"result-{balance}.json").write_text(json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "result": results[-1]}, indent=2))
    results = [json.loads(path.read_text())["result"] for path in sorted(args.out.glob("result-*.json"))]
    results.sort(key=lambda r: r["balance"] != "micro")
    plot(results, args.out / "curves.png")
    for r in results:
        js = r["js_bits_per_layer"]
        print(f"balance={r['balance']:<6} held-out loss english {r['loss']['english']:.3f} python "
              f"{r['loss']['python']:.3f} | JS bits/layer {[round(v, 3) for v in js]} (mean {sum(js) / len(js):.3f}) "
              f"| max/mean {[round(v, 2) for v in r['max_over_mean_per_layer']]} | {r['seconds']:.0f} s")
    if len(results) == 2:
        micro, global_ = (sum(r["js_bits_per_layer"]) / len(r["js_bits_per_layer"]) for r in results)
        print(f"specialisation ratio global/micro: {global_ / micro:.2f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
