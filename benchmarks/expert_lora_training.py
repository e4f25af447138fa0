"""Issue 19 (training): LoRA on MoE experts, a PEFT training step with and without moeplug.

Baseline (what a user runs today): PEFT's `LoraConfig(target_parameters=[experts.gate_up_proj,
experts.down_proj])` on the transformers model, which folds W + scaling * B A for every expert at every
forward. Ours: the same PEFT model on a model patched by `moeplug.patch_model`, whose experts run the
adapter as grouped low-rank GEMMs (and the experts themselves as grouped GEMMs). Only the adapter trains,
as in any LoRA run: the backward computes input gradients through the frozen experts. A step is forward,
backward and an AdamW step. Extra memory: the peak resident memory of one step above the memory held
between steps (weights, adapter, optimizer state), each system alone in a fresh process (Linux
`/proc/self/clear_refs` resets the peak; see MALLOC_ENV). Same weights, same adapter, same batch, one process, fp32 on CPU, forward + backward per step,
median of round-robin repeats.

    .venv/bin/python benchmarks/expert_lora_training.py --json benchmarks/results/expert_lora_training.json
    .venv/bin/python benchmarks/expert_lora_training.py --smoke      # seconds (CI smoke)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).parent))
from moe_layer import _median_times  # noqa: E402

import moeplug  # noqa: E402

SHAPES = {  # name: (experts, top_k, hidden, expert width, layers, batch, sequence)
    "Mixtral-like E8/k2, 4x256 tokens": (8, 2, 512, 1024, 2, 4, 256),
    "fine-grained E64/k8, 4x256 tokens": (64, 8, 512, 128, 2, 4, 256),
    "short sequences E8/k2, 8x32 tokens": (8, 2, 512, 1024, 2, 8, 32),
    "short sequences E64/k8, 8x32 tokens": (64, 8, 512, 128, 2, 8, 32),
}
# In the memory child: every allocation of 64 KiB or more gets its own mapping, returned to the system when
# freed, so resident memory follows what tensors hold (glibc's default keeps freed heap memory resident, which
# lets a step reuse the previous step's pages and hides its peak).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
SMOKE_SHAPES = {"smoke E4/k2": (4, 2, 32, 48, 1, 2, 8)}


def _model(experts: int, top_k: int, hidden: int, width: int, layers: int) -> transformers.PreTrainedModel:
    config = transformers.MixtralConfig(
        vocab_size=512, hidden_size=hidden, intermediate_size=width, num_local_experts=experts,
        num_experts_per_tok=top_k, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
        max_position_embeddings=1024)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()


def _lora(model, rank: int):
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    return get_peft_model(model, config)


def _systems(shape, rank: int) -> tuple[dict, torch.Tensor]:
    """{"transformers + PEFT": model, "moeplug + PEFT": model} with the same weights and adapter, and a batch."""
    experts, top_k, hidden, width, layers, batch, length = shape
    base = _model(experts, top_k, hidden, width, layers)
    patched = copy.deepcopy(base)
    moeplug.patch_model(patched)
    theirs, ours = _lora(base, rank), _lora(patched, rank)
    ours.load_state_dict(theirs.state_dict())
    ids = torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(1))
    return {"transformers + PEFT": theirs, "moeplug + PEFT": ours}, ids


def _train_step(model, ids):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def run():
        optimizer.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    return run


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def extra_memory(system: str, shape, rank: int) -> int:
    """Bytes one training step of `system` holds at its peak above what stays between steps (this process)."""
    models, ids = _systems(shape, rank)
    step = _train_step(models.pop(system), ids)
    del models
    step()  # optimizer state, allocator pools
    before = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    step()
    return _status_bytes("VmHWM") - before


def measure(shape, rank: int, warmup: int, repeats: int) -> dict:
    """Seconds per LoRA training step of PEFT without and with moeplug, extra memory of each, and the ratios."""
    models, ids = _systems(shape, rank)
    seconds = _median_times({name: _train_step(model, ids) for name, model in models.items()}, warmup, repeats)
    memory = {}
    for system in models:  # a fresh process each, so the other system's peak does not count
        child = [sys.executable, __file__, "--memory-of", system, "--shape", json.dumps(shape), "--rank", str(rank)]
        done = subprocess.run(child, check=True, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV})
        memory[system] = int(done.stdout.split()[-1])
    return {"seconds": seconds, "extra_memory_bytes": memory,
            "moeplug_peft_speedup": seconds["transformers + PEFT"] / seconds["moeplug + PEFT"],
            "moeplug_peft_memory_saving": memory["transformers + PEFT"] / max(memory["moeplug + PEFT"], 1),
            "transformers_experts_implementation": models["transformers + PEFT"].config._experts_implementation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, seconds (CI smoke)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # child process: print one system's extra memory
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of:
        print(extra_memory(args.memory_of, json.loads(args.shape), args.rank))
        return
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.smoke:
        args.warmup, args.repeats = 0, 1
    rows = {}
    for name, shape in shapes.items():
        rows[name] = measure(shape, args.rank, args.warmup, args.repeats)
        row = rows[name]
        times = "  ".join(f"{system} {s * 1e3:.0f} ms, +{row['extra_memory_bytes'][system] / 2**20:.0f} MiB"
                          for system, s in row["seconds"].items())
        print(f"{name}: {times}  -> {row['moeplug_peft_speedup']:.2f}x faster, "
              f"{row['moeplug_peft_memory_saving']:.2f}x less extra memory")
    result = {"command": " ".join(sys.argv), "torch": torch.__version__, "transformers": transformers.__version__,
              "machine": platform.processor() or platform.machine(), "threads": args.threads, "rank": args.rank,
              "shapes": {name: list(shape) for name, shape in shapes.items()}, "results": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
