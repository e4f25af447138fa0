"""P3/P4 of issue 7: FP8 optimizer-state memory and step time, FP8 activation memory, loss parity.

Baselines (what a user would pick instead), all in this process on the same weights and gradients:
``torch.optim.AdamW`` (default: a per-tensor for-loop on CPU, and fused), and, when installed, torchao's ``AdamWFp8`` /
``AdamW8bit``, bitsandbytes' ``AdamW8bit`` and DeepSpeed's ``DeepSpeedCPUAdam`` (ZeRO-Offload's host optimizer;
ratios are against it when present).

* **optimizer**: state bytes per parameter (codes + scales + every other state tensor, ``step`` excluded)
  and the median ``opt.step()`` time over ``--steps`` steps after warm-up, on the issue's two MLPs
  (1.6M params with sizes 300/1000; 2.9M params with sizes divisible by 256) and a tiny Llama.
* **activations**: bytes autograd saves per decoder layer of a tiny Llama (h256, 4 layers, batch 8×256,
  sdpa) with and without :func:`moeplug.fp8.compress_activations`, and the worst parameter-gradient SQNR.
* **loss parity**: a small Llama trained ``--parity-steps`` steps on a learnable bigram task with each
  optimizer; mean of the last 10 losses vs AdamW's.

Run: ``.venv/bin/python benchmarks/fp8_memory.py [--threads 1] [--append-results benchmarks/RESULTS.md]``.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

from moeplug.fp8 import FP8AdamW, compress_activations, default_selection, with_attention


def _optional_baselines() -> dict:
    """torchao / bitsandbytes optimizers that import here (each may be missing)."""
    found = {}
    try:
        from torchao.optim import AdamW8bit, AdamWFp8

        found["torchao AdamWFp8"] = lambda p: AdamWFp8(p, lr=1e-3)
        found["torchao AdamW8bit"] = lambda p: AdamW8bit(p, lr=1e-3)
    except ImportError as err:
        print(f"torchao unavailable: {err}", file=sys.stderr)
    try:
        import bitsandbytes

        found["bitsandbytes AdamW8bit"] = lambda p: bitsandbytes.optim.AdamW8bit(p, lr=1e-3)
    except ImportError as err:
        print(f"bitsandbytes unavailable: {err}", file=sys.stderr)
    try:  # ZeRO-Offload's host optimizer (its cpu_adam op compiles on first use, ~200 s, then cached)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        found["DeepSpeedCPUAdam"] = lambda p: DeepSpeedCPUAdam(p, lr=1e-3, weight_decay=1e-2, adamw_mode=True)
    except ImportError as err:
        print(f"deepspeed unavailable: {err}", file=sys.stderr)
    return found


def optimizers() -> dict:
    """Name -> factory taking parameters, ours and the baselines."""
    return {
        "torch AdamW (default)": lambda p: torch.optim.AdamW(p, lr=1e-3),
        "torch AdamW (fused)": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
        "moeplug FP8AdamW": lambda p: FP8AdamW(p, lr=1e-3),  # the fused C++ step on CPU
        "moeplug FP8AdamW (torch path)": lambda p: FP8AdamW(p, lr=1e-3, fused=False),
        **_optional_baselines(),
    }


def _mlp(sizes: list[int]) -> torch.nn.Module:
    layers = []
    for n_in, n_out in zip(sizes, sizes[1:]):
        layers += [torch.nn.Linear(n_in, n_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def _llama(hidden: int, layers: int, vocab: int, intermediate: int) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


MODELS = {
    "MLP 1.6M (300/1000)": lambda: _mlp([300, 1000, 1000, 300]),
    "MLP 2.9M (/256)": lambda: _mlp([768, 1536, 768, 768]),
    "tiny Llama 3.4M": lambda: _llama(256, 4, 1024, 688),
    "MLP 50M (4096)": lambda: _mlp([4096, 4096, 4096, 4096]),
    # Every optimizer keeps its own copy of the weights and gradients (round-robin timing): ~3 GB at 50M,
    # ~17 GB at 300M, so the large ones run on request (--models) only.
    "MLP 300M (10000)": lambda: _mlp([10000, 10000, 10000, 10000]),
}
DEFAULT_MODELS = [name for name in MODELS if "50M" not in name and "300M" not in name]


def _tensor_bytes(value) -> int:
    """Bytes of a state value, looking inside tensor subclasses (torchao keeps codes and scales there)."""
    if not torch.is_tensor(value):
        return 0
    if hasattr(value, "__tensor_flatten__") and type(value) is not torch.Tensor:
        names, _ = value.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(value, name)) for name in names)
    return value.numel() * value.element_size()


def bench_optimizers(make_model, factories: dict, steps: int) -> dict:
    """State bytes per parameter and median step time of each optimizer on copies of one model.

    Steps run round-robin (one step of each optimizer per round), so load changes on a shared machine
    hit every optimizer alike and the ratios stay meaningful."""
    cases = {}
    for name, make_optimizer in factories.items():
        torch.manual_seed(0)
        params = list(make_model().parameters())
        for p in params:
            p.grad = torch.randn_like(p) * 1e-2
        opt = make_optimizer(params)
        start = time.perf_counter()
        opt.step()  # creates the state (and compiles, for torchao)
        cases[name] = dict(opt=opt, params=params, first_step_s=time.perf_counter() - start, times=[])
    for _ in range(steps):
        for case in cases.values():
            start = time.perf_counter()
            case["opt"].step()
            case["times"].append(time.perf_counter() - start)
    rows = {}
    for name, case in cases.items():
        state = case["opt"].state.values()
        state_bytes = sum(_tensor_bytes(v) for s in state for k, v in s.items() if k != "step")
        rows[name] = dict(bytes_per_param=state_bytes / sum(p.numel() for p in case["params"]),
                          step_ms=statistics.median(case["times"]) * 1e3, first_step_s=case["first_step_s"])
    return rows


class _SavedBytes:
    """Counts the distinct storages autograd saves while a module runs (parameters excluded)."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def pack(self, tensor):
        if not (tensor.is_leaf and tensor.requires_grad):
            storage = tensor.untyped_storage()
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def _attention_in_groups(name: str, module: torch.nn.Module) -> str | None:
    """The default selection plus attention modules (1×16 groups), which COAT leaves in high precision."""
    if "attention" in type(module).__name__.lower():
        return "group"
    return default_selection(name, module)


SELECTIONS = {"FP8, default selection": default_selection, "FP8, attention included": _attention_in_groups,
              "FP8, attention q/k/v + recomputed output": with_attention}


def bench_activations(select) -> dict:
    """Saved bytes per decoder layer of the issue's tiny Llama, and its parameter gradients.

    ``select`` is a :func:`compress_activations` selection, or ``None`` for no compression."""
    model = _llama(256, 4, 1024, 688)
    ids = torch.randint(0, 1024, (8, 256), generator=torch.Generator().manual_seed(0))
    compressor = compress_activations(model, select) if select else None
    per_layer, hooks = [], []
    for layer in model.model.layers:
        counter, stack = _SavedBytes(), []

        def enter(module, args, counter=counter, stack=stack):
            # Pushed before the layer's children push theirs, so it sees only what they leave alone.
            hooks_ctx = torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t)
            hooks_ctx.__enter__()
            stack.append((hooks_ctx, compressor.packed_bytes if compressor else 0))

        def leave(module, args, output, counter=counter, stack=stack):
            hooks_ctx, packed_before = stack.pop()
            hooks_ctx.__exit__(None, None, None)
            packed = (compressor.packed_bytes - packed_before) if compressor else 0
            per_layer.append(counter.total + packed)

        hooks += [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave)]
    model(ids, labels=ids).loss.backward()
    for hook in hooks:
        hook.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return dict(per_layer_bytes=per_layer, grads=grads)


def _bigram_batches(steps: int, vocab: int = 128, seq: int = 48, batch: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    transitions = torch.softmax(torch.randn(vocab, vocab, generator=gen) * 3, dim=-1)
    for _ in range(steps):
        tokens = [torch.randint(0, vocab, (batch,), generator=gen)]
        for _ in range(seq - 1):
            tokens.append(torch.multinomial(transitions[tokens[-1]], 1, generator=gen).squeeze(1))
        yield torch.stack(tokens, dim=1)


def bench_parity(make_optimizer, compress: bool, steps: int) -> float:
    """Mean of the last 10 training losses of a small Llama on the bigram task."""
    model = _llama(64, 2, 128, 176)
    opt = make_optimizer(model.parameters())
    if compress:
        compress_activations(model)
    losses = []
    for ids in _bigram_batches(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-10:]) / 10


PARTS = ("optimizer", "activations", "parity")


def run(args) -> dict:
    """The measurements named in ``args.parts``; returns the JSON-able results."""
    opts, results = optimizers(), {}
    if "optimizer" in args.parts:
        results["optimizer"] = {model: bench_optimizers(MODELS[model], opts, args.steps) for model in args.models}
    if "activations" in args.parts:
        plain = bench_activations(None)
        activations = {"fp32": dict(per_layer_bytes=plain["per_layer_bytes"])}
        for label, select in SELECTIONS.items():
            compressed = bench_activations(select)
            sqnr = min((10 * torch.log10(ref.pow(2).sum() / (compressed["grads"][n] - ref).pow(2).sum())).item()
                       for n, ref in plain["grads"].items())
            activations[label] = dict(per_layer_bytes=compressed["per_layer_bytes"], worst_grad_sqnr_db=sqnr)
        results["activations"] = activations
    if "parity" in args.parts:
        # The torch path's loss is the fused step's to quantisation noise (tests/fp8/test_fp8_fused.py).
        parity = {name: bench_parity(factory, False, args.parity_steps) for name, factory in opts.items()
                  if "fused" not in name and "torch path" not in name}
        parity["moeplug FP8AdamW + FP8 activations"] = bench_parity(opts["moeplug FP8AdamW"], True,
                                                                    args.parity_steps)
        results["parity"] = parity
    return results


def markdown(results: dict, command: str, threads: int) -> str:
    """The RESULTS.md section."""
    first = next(iter(results.get("optimizer", {}).values()), {})
    base_name = "DeepSpeedCPUAdam" if "DeepSpeedCPUAdam" in first else "torch AdamW (default)"
    lines = [f"\n## FP8 optimizer states and activations (issue 7, P3/P4)\n",
             f"Command: `{command}` (torch {torch.__version__}, {threads} intra-op thread(s), shared 2-core CPU; "
             "median `opt.step()` over round-robin rounds after one warm-up step; bytes = every state tensor but "
             f"`step`; ratio = step time / {base_name}'s).\n"]
    if "optimizer" in results:
        models = list(results["optimizer"])
        lines.append("| optimizer | " + " | ".join(models) + " |")
        lines.append("|---" * (len(models) + 1) + "|")
        base = {m: results["optimizer"][m][base_name]["step_ms"] for m in models}
        for name in results["optimizer"][models[0]]:
            cells = [f"{r['bytes_per_param']:.2f} B/param, {r['step_ms']:.2f} ms ({r['step_ms'] / base[m]:.2f}x)"
                     for m in models for r in [results["optimizer"][m][name]]]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "activations" in results:
        act = results["activations"]
        fp32 = act["fp32"]["per_layer_bytes"]
        lines.append("\nSaved activations per decoder layer (MiB; layers 0..3), tiny Llama h256 × 4 layers, "
                     "batch 8×256, sdpa; worst parameter-gradient SQNR vs uncompressed:\n")
        lines.append("| activations | per layer MiB | vs fp32 | worst grad SQNR |\n|---|---|---|---|")
        for label, row in act.items():
            mib = " / ".join(f"{b / 2**20:.1f}" for b in row["per_layer_bytes"])
            ratio = sum(row["per_layer_bytes"]) / sum(fp32)
            sqnr = f"{row['worst_grad_sqnr_db']:.1f} dB" if "worst_grad_sqnr_db" in row else "-"
            lines.append(f"| {label} | {mib} | {ratio:.2f}x | {sqnr} |")
    if "parity" in results:
        ref = results["parity"]["torch AdamW (default)"]
        lines.append("\nLoss parity (small Llama h64 × 2 layers, bigram task; mean of the last 10 losses):\n")
        lines.append("| optimizer | final loss | vs AdamW |\n|---|---|---|")
        for name, loss in results["parity"].items():
            lines.append(f"| {name} | {loss:.4f} | {100 * (loss - ref) / ref:+.2f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse arguments, run, write JSON and optionally append the RESULTS.md section."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per case")
    parser.add_argument("--parity-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=DEFAULT_MODELS,
                        help="optimizer-part models (the 50M and 300M MLPs are not defaults: memory)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "fp8_memory.json")
    parser.add_argument("--append-results", type=Path, help="append a markdown section to this RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    load = {"before": load_before, "after": os.getloadavg()}
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "loadavg": load, **results},
                                    indent=2))
    section = markdown(results, "python " + " ".join(sys.argv), args.threads)
    print(section)
    if args.append_results:
        with args.append_results.open("a") as results_md:
            results_md.write(section)


if __name__ == "__main__":
    main()
