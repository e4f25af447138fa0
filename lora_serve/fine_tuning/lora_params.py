"""Trainable LoRA factors hooked onto the served model's own linear layers, saved as PEFT writes them.

No second copy of the base: a forward hook on each targeted ``nn.Linear`` (the engine's ``BatchedLoRALinear``
wraps it, but calls it) adds ``(x A^T B^T) * alpha / r``, PEFT's LoRA forward, while ``attached()`` is open.
The factors are fp32 (master weights, as PEFT trains them); A starts as PEFT initialises it
(``kaiming_uniform_(a=sqrt(5))``, drawn from a generator seeded with the job's seed, in module order), B at zero.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn

from ..lora_layers import BatchedLoRALinear

_PREFIX = "base_model.model."


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The model's linear layers by their Hugging Face names (the engine's wrappers seen through), output
    layer excluded, as an adapter may target them."""
    wrapped = {name: m.base for name, m in model.named_modules() if isinstance(m, BatchedLoRALinear)}
    inner = {id(m) for m in wrapped.values()}
    output = model.get_output_embeddings()
    plain = {name: m for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and id(m) not in inner and m is not output}
    return dict(sorted({**plain, **wrapped}.items()))


def match_targets(model: nn.Module, target_modules: list[str] | str) -> dict[str, nn.Linear]:
    """The linears ``target_modules`` selects, as PEFT matches them (``"all-linear"``: every one): a name equal
    to a key, or ending in ``.<key>``; ``ValueError`` naming the keys when none matches."""
    layers = linear_layers(model)
    if target_modules == "all-linear":
        return layers
    chosen = {name: m for name, m in layers.items()
              if any(name == key or name.endswith(f".{key}") for key in target_modules)}
    if not chosen:
        suffixes = sorted({name.rpartition(".")[2] for name in layers})
        raise ValueError(f"lora target_modules {target_modules} match no linear layer; this model has {suffixes}")
    return chosen


class LoRAParams(nn.Module):
    """Rank-``r`` LoRA factors for ``layers`` (name -> linear), scaled by ``alpha / r``."""

    def __init__(self, layers: dict[str, nn.Linear], r: int, alpha: float, seed: int):
        super().__init__()
        self.layers, self.r, self.alpha, self.scale = layers, r, alpha, alpha / r
        generator = torch.Generator().manual_seed(seed)
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        for i, (name, layer) in enumerate(layers.items()):
            a = torch.empty(r, layer.in_features)
            bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform_(a=sqrt(5)) on an [r, in] weight
            a.uniform_(-bound, bound, generator=generator)
            self.a[str(i)] = nn.Parameter(a.to(layer.weight.device))
            self.b[str(i)] = nn.Parameter(torch.zeros(layer.out_features, r, device=layer.weight.device))

    def factors(self) -> Iterator[tuple[str, nn.Parameter, nn.Parameter]]:
        """``(layer name, A [r, in], B [out, r])`` in module order."""
        for i, name in enumerate(self.layers):
            yield name, self.a[str(i)], self.b[str(i)]

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """Add this LoRA to the model's forwards inside the block."""
        handles = [layer.register_forward_hook(self._hook(a, b)) for (_, a, b), layer
                   in zip(self.factors(), self.layers.values())]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, a: nn.Parameter, b: nn.Parameter):
        def hook(module, inputs, output):
            x = inputs[0].to(a.dtype)
            return output + ((x @ a.t()) @ b.t() * self.scale).to(output.dtype)
        return hook

    def save_peft(self, path: Path, base_name: str) -> None:
        """Write ``path`` as a PEFT LoRA adapter directory (``adapter_config.json`` + safetensors)."""
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, a, b in self.factors():
            tensors[f"{_PREFIX}{name}.lora_A.weight"] = a.detach().float().cpu().contiguous()
            tensors[f"{_PREFIX}{name}.lora_B.weight"] = b.detach().float().cpu().contiguous()
        save_file(tensors, str(path / "adapter_model.safetensors"))
        # PEFT writes its own config file; exact module names as targets: PEFT adapts no other layer.
        LoraConfig(task_type="CAUSAL_LM", r=self.r, lora_alpha=self.alpha, lora_dropout=0.0, bias="none",
                   target_modules=list(self.layers), base_model_name_or_path=base_name).save_pretrained(str(path))

    def load_peft(self, path: Path) -> None:
        """Copy the factors of the PEFT adapter ``save_peft`` wrote in ``path`` into these parameters."""
        tensors = load_file(str(path / "adapter_model.safetensors"))
        with torch.no_grad():
            for name, a, b in self.factors():
                a.copy_(tensors[f"{_PREFIX}{name}.lora_A.weight"])
                b.copy_(tensors[f"{_PREFIX}{name}.lora_B.weight"])
