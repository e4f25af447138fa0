"""Host-side store of LoRA adapters read from PEFT directories, validated against the base model.

Every registered adapter lives here (host memory) whether or not it is in the page pool; the pool only
holds the ones in use (see ``residency.py``). Loading reads ``adapter_config.json`` and
``adapter_model.safetensors`` as PEFT writes them and checks every tensor against the base model's
linear layers before anything is registered, so a bad adapter never disturbs the loaded ones.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias terms",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "layer_replication": "layer replication",
}


class AdapterError(ValueError):
    """An adapter cannot be registered: bad files, unsupported options, or a mismatch with the base model."""


@dataclass(frozen=True)
class LinearShape:
    """A base-model linear layer LoRA may target: ``y = x W^T`` with ``W [out_features, in_features]``."""

    in_features: int
    out_features: int


@dataclass(frozen=True)
class LoRAWeights:
    """One adapted linear: ``A [rank, in]``, ``B [out, rank]`` and the scale applied to ``x A^T B^T``."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        """The LoRA rank of this module."""
        return self.a.shape[0]


@dataclass(frozen=True)
class Adapter:
    """A validated adapter in host memory: module name (as in the base model) -> weights."""

    name: str
    path: str
    modules: dict[str, LoRAWeights]

    @property
    def max_rank(self) -> int:
        """The largest rank over the adapted modules."""
        return max(w.rank for w in self.modules.values())


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name suffix (as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def _read_config(path: Path) -> dict:
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"{path}: no adapter_config.json (expected a PEFT adapter directory)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{config_file}: not valid JSON ({err})") from err
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{config_file}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    for option, what in _UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise AdapterError(f"{config_file}: {what} is not supported ({option}={config[option]!r})")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{config_file}: bias={config['bias']!r} is not supported, expected 'none'")
    for field_name in ("r", "lora_alpha"):
        if not isinstance(config.get(field_name), (int, float)) or config[field_name] <= 0:
            raise AdapterError(f"{config_file}: {field_name} must be a positive number, got {config.get(field_name)!r}")
    return config


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise AdapterError(f"{path}: no adapter_model.safetensors (only the safetensors format is supported)")
    try:
        return load_file(str(weights_file))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise AdapterError(f"{weights_file}: cannot read safetensors ({err})") from err


def load_peft_adapter(
    name: str, path: str | Path, linears: dict[str, LinearShape], dtype: torch.dtype
) -> Adapter:
    """Read and validate the PEFT LoRA adapter in directory ``path`` against the base model's ``linears``.

    Raises ``AdapterError`` naming the offending file, key or value and what was expected.
    """
    path = Path(path)
    config = _read_config(path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _read_tensors(path).items():
        match = _KEY.match(key[len(_PREFIX) :]) if key.startswith(_PREFIX) else None
        if match is None:
            raise AdapterError(
                f"{path}: unexpected tensor {key!r}; expected '{_PREFIX}<module>.lora_A.weight' / '.lora_B.weight'"
            )
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    if not pairs:
        raise AdapterError(f"{path}: adapter_model.safetensors holds no LoRA weights")

    modules = {}
    for module, ab in sorted(pairs.items()):
        modules[module] = _validate_module(path, module, ab, linears, config, dtype)
    return Adapter(name=name, path=str(path), modules=modules)


def _validate_module(path, module, ab, linears, config, dtype) -> LoRAWeights:
    if module not in linears:
        targets = sorted({m.rsplit(".", 1)[-1] for m in linears})
        raise AdapterError(
            f"{path}: adapter targets {module!r}, which is not a linear layer of the base model "
            f"(adaptable layers end in {targets})"
        )
    if set(ab) != {"A", "B"}:
        raise AdapterError(f"{path}: {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
    a, b = ab["A"], ab["B"]
    shape = linears[module]
    rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    expected_a, expected_b = (rank, shape.in_features), (shape.out_features, rank)
    if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
        raise AdapterError(
            f"{path}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; the base layer "
            f"({shape.in_features} -> {shape.out_features}) with r={rank} needs {expected_a} and {expected_b}"
        )
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise AdapterError(f"{path}: {module} has non-finite LoRA weights")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoRAWeights(a=a.to(dtype).contiguous(), b=b.to(dtype).contiguous(), scale=float(scale))


class AdapterStore:
    """Registered adapters by name, in host memory. Not thread-safe; the engine serialises access."""

    def __init__(self, linears: dict[str, LinearShape], dtype: torch.dtype):
        self.linears = linears
        self.dtype = dtype
        self._adapters: dict[str, Adapter] = {}

    def load(self, name: str, path: str | Path) -> Adapter:
        """Read and validate an adapter; the store is unchanged (call ``add``) so a failure disturbs nothing."""
        if not isinstance(name, str) or not name:
            raise AdapterError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self._adapters:
            raise AdapterError(f"adapter {name!r} is already registered (from {self._adapters[name].path})")
        return load_peft_adapter(name, path, self.linears, self.dtype)

    def add(self, adapter: Adapter) -> None:
        """Register a validated adapter."""
        if adapter.name in self._adapters:
            raise AdapterError(f"adapter {adapter.name!r} is already registered")
        self._adapters[adapter.name] = adapter

    def remove(self, name: str) -> Adapter:
        """Unregister and return adapter ``name``."""
        return self._adapters.pop(self._require(name))

    def get(self, name: str) -> Adapter:
        """The adapter registered as ``name``."""
        return self._adapters[self._require(name)]

    def names(self) -> list[str]:
        """Registered adapter names, in registration order."""
        return list(self._adapters)

    def __contains__(self, name: str) -> bool:
        return name in self._adapters

    def _require(self, name: str) -> str:
        if name not in self._adapters:
            raise KeyError(f"unknown adapter {name!r}; registered: {len(self._adapters)} adapters")
        return name
