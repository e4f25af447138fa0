"""Load the base model (and its tokenizer) from a Hugging Face directory or a GGUF file."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel


def load_base_model(source: str | Path, dtype: torch.dtype) -> tuple[PreTrainedModel, object]:
    """Load a causal LM and its tokenizer from an HF model directory or a ``.gguf`` file.

    GGUF weights are dequantised by transformers into ``dtype``. Returns ``(model, tokenizer)``; the
    tokenizer is None when the source ships none.
    """
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        location, kwargs = str(path.parent), {"gguf_file": path.name}
    elif path.is_dir():
        location, kwargs = str(path), {}
    else:
        raise FileNotFoundError(f"{source} is neither a model directory nor a .gguf file")
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except (OSError, ValueError):  # a bare weights directory without tokenizer files
        tokenizer = None
    return model, tokenizer
