"""Issue 19 (training): LoRA on MoE experts, a PEFT training step with and without moeplug.

Baseline (what a user runs today): PEFT's `LoraConfig(target_parameters=[experts.gate_up_proj,
experts.down_proj])` on the transformers model, which folds W + scaling * B A for every expert at every
forward. Ours: the same PEFT model on a model patched by `moeplug.patch_model`, whose experts run the
adapter as grouped low-rank GEMMs (and the experts themselves as grouped GEMMs). Only the adapter trains,
as in any LoRA run: the backward computes input gradients through the frozen experts. Same weights, same adapter, same batch, one process, fp32 on CPU, forward + backward per step,
median of round-robin repeats.

    .venv/bin/python benchmarks/expert_lora_training.py --json benchmarks/results/expert_lora_training.json
    .venv/bin/python benchmarks/expert_lora_training.py --smoke      # seconds (CI smoke)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
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
}
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


def _step(model, ids):
    def run():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
    return run


def measure(shape, rank: int, warmup: int, repeats: int) -> dict:
    """Seconds per LoRA training step (forward + backward) of PEFT without and with moeplug, and the ratio."""
    experts, top_k, hidden, width, layers, batch, length = shape
    base = _model(experts, top_k, hidden, width, layers)
    patched = copy.deepcopy(base)
    moeplug.patch_model(patched)
    theirs, ours = _lora(base, rank), _lora(patched, rank)
    ours.load_state_dict(theirs.state_dict())
    ids = torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(1))
    steps = {"transformers + PEFT": _step(theirs, ids), "moeplug + PEFT": _step(ours, ids)}
    seconds = _median_times(steps, warmup, repeats)
    return {"seconds": seconds, "moeplug_peft_speedup": seconds["transformers + PEFT"] / seconds["moeplug + PEFT"],
            "transformers_experts_implementation": theirs.config._experts_implementation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, seconds (CI smoke)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.smoke:
        args.warmup, args.repeats = 0, 1
    rows = {}
    for name, shape in shapes.items():
        rows[name] = measure(shape, args.rank, args.warmup, args.repeats)
        times = "  ".join(f"{impl} {s * 1e3:.0f} ms" for impl, s in rows[name]["seconds"].items())
        print(f"{name}: {times}  -> moeplug+PEFT {rows[name]['moeplug_peft_speedup']:.2f}x PEFT's step")
    result = {"command": " ".join(sys.argv), "torch": torch.__version__, "transformers": transformers.__version__,
              "machine": platform.processor() or platform.machine(), "threads": args.threads, "rank": args.rank,
              "shapes": {name: list(shape) for name, shape in shapes.items()}, "results": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
