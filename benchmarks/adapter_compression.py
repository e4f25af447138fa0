"""Issue 22: serving N compressed adapters (shared bases + per-adapter cores) vs the same N uncompressed.

Adapters: realistic LoRAs trained briefly on distinct synthetic tasks (``lora_tasks.py``: 8 task families,
ranks 8/16 on q/v/down_proj of P2's tiny Llama, weights x4), cached under benchmarks/out/compress/; each
from its own random A (PEFT's default init).
For each N, the first N are compressed (``lora_serve.compress``: shared rank ``--rank``, ``--clusters``
groups found by k-subspaces; the time is recorded) and served by ``Engine.add_adapter_collection``.

Systems, all in one process on the same base weights and requests (P2's closed batch: R requests, P-token
prompts, G new tokens, greedy, EOS ignored, Zipf(1) adapter popularity), repeats round-robin, medians:
  uncompressed-N   the engine with the N PEFT adapters (the baseline a user has today)
  compressed-N     the engine with the N adapters' compressed collection
  base             the engine without adapters
The goal compares compressed-1000 with uncompressed-10 (the engine's 10-adapter throughput).
Quality: held-out loss of every adapter on fresh data of its task, uncompressed vs compressed (rebuilt
``U Σ V^T``), with the base model and a sibling task's adapter (same family) as references.

    .venv/bin/python benchmarks/adapter_compression.py --json benchmarks/results/adapter_compression_tiny.json
    .venv/bin/python benchmarks/adapter_compression.py --smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from lora_serving import zipf_choice  # noqa: E402  (sibling scripts: the P2 harness and the task trainer)
from lora_tasks import CONFIG, ensure_adapters, held_out_losses, tiny_base

from lora_serve import Engine, EngineConfig, SamplingParams
from lora_serve.collection import read_adapters
from lora_serve.compress import compress

CACHE = Path(__file__).parent / "out" / "compress"


def build(args, base, paths: list[str], root: Path) -> tuple[dict, dict, dict]:
    """Engines (uncompressed-N, compressed-N per N, base) and the compression records; the largest N's
    adapters and collection for the quality measurement."""
    config = EngineConfig(pool_mb=args.pool_mb, max_batch_size=max(64, args.requests),
                          max_batch_tokens=args.max_batch_tokens, max_resident_adapters=args.resident)
    engines, records, largest = {"base": Engine(copy.deepcopy(base), config=config)}, {}, {}
    for n in args.num_adapters:
        names = {f"t{i}": paths[i] for i in range(n)}
        adapters, _ = read_adapters(names)
        start = time.perf_counter()
        collection = compress(adapters, args.rank, min(args.clusters, n))
        seconds = time.perf_counter() - start
        collection.save(root / f"c{n}")
        errors = [e["relative_error"] for e in collection.errors.values()]
        records[n] = {"compress_s": seconds, "groups": [len(g.names) for g in collection.groups],
                      "relative_error_mean": statistics.mean(errors), "relative_error_max": max(errors)}
        plain = engines[f"uncompressed-{n}"] = Engine(copy.deepcopy(base), config=config)
        for name, path in names.items():
            plain.add_adapter(name, path)
        packed = engines[f"compressed-{n}"] = Engine(copy.deepcopy(base), config=config)
        packed.add_adapter_collection(root / f"c{n}")
        records[n]["memory"] = memory_per_adapter(plain, packed, n)
        print(f"N={n}: compressed in {seconds:.1f} s, groups {records[n]['groups']}, relative error mean "
              f"{records[n]['relative_error_mean']:.3f}", flush=True)
        largest = {"adapters": adapters, "collection": collection}
    return engines, records, largest


def memory_per_adapter(plain: Engine, packed: Engine, n: int) -> dict:
    """Pool bytes per adapter when resident: uncompressed A/B vs core + the shared bases spread over N."""
    slot_bytes = plain.pool_stats().bytes_per_slot
    core = statistics.mean(a.pool_slots for a in packed.list_adapters())
    bases = packed.pool_stats().adapters  # nothing is resident yet: these slots are the bases
    return {"uncompressed_bytes": statistics.mean(a.pool_slots for a in plain.list_adapters()) * slot_bytes,
            "compressed_core_bytes": core * slot_bytes, "compressed_bases_bytes": bases * slot_bytes,
            "compressed_bytes": (core + bases / n) * slot_bytes}


def throughput(args, engines: dict) -> dict:
    """Closed-batch tokens/s per system (median of ``--repeats``, round-robin)."""
    rng = np.random.default_rng(0)
    vocab = next(iter(engines.values())).vocab_size
    prompts = rng.integers(3, vocab, size=(args.requests, args.prompt_len)).tolist()
    choice = {n: [f"t{i}" for i in zipf_choice(n, args.requests, rng)] for n in args.num_adapters}
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    runs = {name: [] for name in engines}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, engine in engines.items():
            adapters = None if name == "base" else choice[int(name.rsplit("-", 1)[1])]
            start = time.perf_counter()
            engine.generate(prompts, params, adapters)
            if repeat:
                runs[name].append(args.requests * args.new_tokens / (time.perf_counter() - start))
    out = {name: {"tokens_per_s": statistics.median(r), "all_tokens_per_s": r} for name, r in runs.items()}
    for n in args.num_adapters:
        out[f"compressed-{n}"]["distinct_in_batch"] = len(set(choice[n]))
    return out


def _stacked(names: list[str], modules: list[str], get) -> dict[str, tuple]:
    """module -> ``(A [n, R, in], B [n, out, R])`` zero-padded from ``get(name, module) -> (A, B scaled)``."""
    out = {}
    for m in modules:
        pairs = [get(n, m) for n in names]
        top = max(a.shape[0] for a, _ in pairs)
        a_all = torch.zeros(len(names), top, pairs[0][0].shape[1])
        b_all = torch.zeros(len(names), pairs[0][1].shape[0], top)
        for i, (a, b) in enumerate(pairs):
            a_all[i, : a.shape[0]], b_all[i, :, : b.shape[1]] = a, b
        out[m] = (a_all, b_all)
    return out


def _rebuilt(collection):
    """``get(name, module)`` of the adapters rebuilt from ``collection``: ``A = Σ V^T``, ``B = U`` (scale 1)."""
    position = {n: (g, j) for g in collection.groups for j, n in enumerate(g.names)}

    def get(name, module):
        group, j = position[name]
        u, v = group.bases[module]
        return group.cores[module][j] @ v.t(), u

    return get


def _change(compressed: list[float], plain: list[float]) -> dict:
    change = [(c - u) / u for c, u in zip(compressed, plain)]
    return {"compressed_mean": statistics.mean(compressed), "relative_change_mean": statistics.mean(change),
            "relative_change_max": max(change), "within_2_percent": sum(abs(c) <= 0.02 for c in change) / len(change),
            "at_most_2_percent_worse": sum(c <= 0.02 for c in change) / len(change)}


def quality(base, adapters: dict, collection, cfg: dict, sweep: list[tuple[int, int]] = ()) -> dict:
    """Held-out loss per task: base, uncompressed adapter, compressed adapter, a sibling task's adapter; and the
    compressed loss at each ``(clusters, rank)`` of ``sweep`` (compressed again here, timed)."""
    names = list(adapters)
    task = [int(name[1:]) for name in names]
    modules = sorted(adapters[names[0]].modules)
    plain = _stacked(names, modules, lambda n, m: (adapters[n].modules[m].a, adapters[n].modules[m].b * adapters[n].modules[m].scale))
    family = cfg["families"]
    sibling = [t + family if t + family < len(task) else t - family for t in task]  # adapter i on a sibling's task
    zero = {m: (a, b * 0) for m, (a, b) in plain.items()}
    losses = {"base": held_out_losses(base, zero, task, cfg), "uncompressed": held_out_losses(base, plain, task, cfg),
              "compressed": held_out_losses(base, _stacked(names, modules, _rebuilt(collection)), task, cfg),
              "sibling_adapter": held_out_losses(base, plain, sibling, cfg)}
    result = {"mean": {k: statistics.mean(v) for k, v in losses.items()}, **_change(losses["compressed"], losses["uncompressed"]),
              "sweep": {}}
    for k, c in sweep:
        start = time.perf_counter()
        other = compress(adapters, c, k)
        seconds = time.perf_counter() - start
        result["sweep"][f"{k}x{c}"] = {"compress_s": seconds, **_change(
            held_out_losses(base, _stacked(names, modules, _rebuilt(other)), task, cfg), losses["uncompressed"])}
        print(f"sweep {k} clusters x rank {c}: {result['sweep'][f'{k}x{c}']}", flush=True)
    return result


def _gain_kept(mean: dict) -> float:
    """(sibling - compressed) / (sibling - uncompressed) of the mean losses: a ratio of aggregates, since the
    per-task ratios have denominators near zero."""
    return (mean["sibling_adapter"] - mean["compressed"]) / (mean["sibling_adapter"] - mean["uncompressed"])


def markdown(args, result: dict) -> str:
    """The RESULTS.md section."""
    tp, q = result["throughput"], result["quality"]
    ref = tp[f"uncompressed-{args.num_adapters[0]}"]["tokens_per_s"]
    lines = [f"\n## Issue 22: compressed adapter collections (tiny Llama, fp32, CPU, {args.threads} thread)\n",
             f"`{' '.join(shlex.quote(a) for a in ['.venv/bin/python', *sys.argv])}`\n",
             f"Shared rank {args.rank}, {args.clusters} clusters; closed batch {args.requests} x {args.prompt_len} -> "
             f"{args.new_tokens} tokens, Zipf(1); median of {args.repeats}; load average at the end "
             + "/".join(f"{x:.1f}" for x in result["load_average_1_5_15"]) + ".\n",
             f"| N | distinct in batch | uncompressed tok/s | compressed tok/s | compressed / uncompressed | compressed / "
             f"uncompressed-{args.num_adapters[0]} | pool bytes per adapter (uncompressed / compressed) | compress time | "
             "relative error mean / max |", "|---" * 9 + "|"]
    for n in args.num_adapters:
        r, c, u = result["compression"][n], tp[f"compressed-{n}"]["tokens_per_s"], tp[f"uncompressed-{n}"]["tokens_per_s"]
        mem = r["memory"]
        lines.append(f"| {n} | {tp[f'compressed-{n}']['distinct_in_batch']} | {u:.1f} | {c:.1f} | {c / u:.2f}x | {c / ref:.2f}x | "
                     f"{mem['uncompressed_bytes'] / 1024:.0f} KiB / {mem['compressed_bytes'] / 1024:.1f} KiB | "
                     f"{r['compress_s']:.1f} s | {r['relative_error_mean']:.3f} / {r['relative_error_max']:.3f} |")
    lines += ["", f"Engine without adapters: {tp['base']['tokens_per_s']:.1f} tok/s. Held-out loss over the "
              f"{args.num_adapters[-1]} tasks (mean): base {q['mean']['base']:.3f}, uncompressed {q['mean']['uncompressed']:.3f}, "
              f"compressed {q['mean']['compressed']:.3f}, a sibling task's adapter {q['mean']['sibling_adapter']:.3f}; "
              f"compressed vs uncompressed per task: mean {100 * q['relative_change_mean']:+.2f}%, worst "
              f"{100 * q['relative_change_max']:+.2f}%, {100 * q['within_2_percent']:.0f}% of tasks within ±2%, "
              f"{100 * q['at_most_2_percent_worse']:.0f}% at most 2% worse; of the uncompressed adapters' gain over a "
              f"sibling task's adapter, compression keeps {_gain_kept(q['mean']):.2f}x."]
    if q["sweep"]:
        lines += ["", f"Other clusters x shared rank on the {args.num_adapters[-1]} adapters (held-out loss, compressed vs "
                  "uncompressed; bases read per decode step grow with clusters x rank):", "",
                  "| clusters x rank | mean change | worst | tasks within ±2% | at most 2% worse | compress time |",
                  "|---|---|---|---|---|---|"]
        for key, r in q["sweep"].items():
            lines.append(f"| {key} | {100 * r['relative_change_mean']:+.2f}% | {100 * r['relative_change_max']:+.2f}% | "
                         f"{100 * r['within_2_percent']:.0f}% | {100 * r['at_most_2_percent_worse']:.0f}% | {r['compress_s']:.0f} s |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--num-adapters", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--rank", type=int, default=32, help="shared rank per group and layer")
    p.add_argument("--clusters", type=int, default=1)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--pool-mb", type=float, default=256)
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--resident", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sweep", nargs="*", default=[], metavar="KxC",
                   help="also the held-out loss at these clusters x shared rank on the largest N, e.g. 1x32 4x16")
    p.add_argument("--smoke", action="store_true", help="4 adapters trained 2 steps in a temporary directory")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    base = tiny_base()
    with tempfile.TemporaryDirectory() as tmp:
        cfg, root = CONFIG, CACHE / f"tiny{max(args.num_adapters)}"
        if args.smoke:
            args.num_adapters, args.requests, args.prompt_len, args.new_tokens, args.repeats = [4], 4, 8, 4, 1
            args.rank, args.clusters = 8, 2
            cfg, root = {**CONFIG, "steps": 2, "families": 2}, Path(tmp) / "adapters"
        with torch.enable_grad():
            paths = ensure_adapters(base, root, max(args.num_adapters), cfg)
        engines, records, largest = build(args, base, paths, Path(tmp))
        result = {"compression": records, "throughput": throughput(args, engines),
                  "quality": quality(base, largest["adapters"], largest["collection"], cfg,
                                     [tuple(int(v) for v in kc.split("x")) for kc in args.sweep]),
                  "train": json.loads((Path(paths[0]).parent / "tasks.json").read_text()),
                  "load_average_1_5_15": os.getloadavg()}
    text = markdown(args, result)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "result": result}, indent=1,
                                        default=str))


if __name__ == "__main__":
    main()
