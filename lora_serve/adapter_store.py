"""Host-side store of LoRA adapters read from PEFT directories, validated against the base model.

Every registered adapter lives here (host memory) whether or not it is in the page pool; the pool only
holds the ones in use (see ``residency.py``). Loading reads ``adapter_config.json`` and
``adapter_model.safetensors`` as PEFT writes them and checks every tensor against the base model's
linear layers before anything is registered, so a bad adapter never disturbs the loaded ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load

MAX_NAME_LENGTH = 256  # characters of an adapter name
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
    """A validated adapter in host memory: module name (as in the base model) -> weights.

    ``digest`` identifies its files' content: adapters with equal digests share their weights.
    """

    name: str
    path: str
    modules: dict[str, LoRAWeights]
    digest: str = ""

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


def _short(value) -> str:
    """A repr for error messages, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _read_file(path: Path, name: str, label: str, max_bytes: int | None = None) -> bytes:
    """The bytes of ``path/name``; an ``AdapterError`` (naming only ``label`` and ``name``, never the server's
    directories) when it is missing, unreadable or larger than ``max_bytes``."""
    file = path / name
    try:
        if not file.is_file():
            raise AdapterError(f"{label}: no {name} (expected a PEFT LoRA adapter directory saved as safetensors)")
        if max_bytes is not None and file.stat().st_size > max_bytes:
            raise AdapterError(f"{label}: {name} is {file.stat().st_size / 2**20:.1f} MiB, more than the host "
                               "memory left for adapters could hold (unload adapters or raise the limit)")
        return file.read_bytes()
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        if isinstance(err, AdapterError):
            raise
        raise AdapterError(f"{label}: cannot read {name} ({getattr(err, 'strerror', None) or err})") from None


def _parse_config(data: bytes, label: str) -> dict:
    where = f"{label}: adapter_config.json"
    try:
        config = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise AdapterError(f"{where} is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise AdapterError(f"{where} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{where} must hold a JSON object, got a {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: peft_type is {_short(config.get('peft_type'))}, expected 'LORA'")
    for option, what in _UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise AdapterError(f"{where}: {what} is not supported ({option}={_short(config[option])})")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{where}: bias={_short(config['bias'])} is not supported, expected 'none'")
    for field_name in ("r", "lora_alpha"):
        if not _positive_number(config.get(field_name)):
            raise AdapterError(f"{where}: {field_name} must be a positive number, got {_short(config.get(field_name))}")
    for field_name in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(field_name) or {}
        if not isinstance(patterns, dict):
            raise AdapterError(f"{where}: {field_name} must be an object of regex -> number, got {_short(patterns)}")
        for key, value in patterns.items():
            try:
                re.compile(rf"(.*\.)?{key}$")
            except re.error as err:
                raise AdapterError(f"{where}: {field_name} key {_short(key)} is not a valid regex ({err})") from None
            if not _positive_number(value):
                raise AdapterError(f"{where}: {field_name}[{_short(key)}] must be a positive number, got {_short(value)}")
    return config


def _parse_tensors(data: bytes, label: str) -> dict[str, torch.Tensor]:
    try:
        return safetensors_load(data)
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise AdapterError(f"{label}: cannot read adapter_model.safetensors ({_short(str(err))})") from None


def load_peft_adapter(
    name: str, path: str | Path, linears: dict[str, LinearShape], dtype: torch.dtype, max_bytes: int | None = None
) -> Adapter:
    """Read and validate the PEFT LoRA adapter in directory ``path`` against the base model's ``linears``.

    Raises ``AdapterError`` naming the adapter, the offending file, key or value and what was expected
    (never the server's directories). A weights file over ``max_bytes`` is refused before it is read.
    """
    label = f"adapter {_short(name)}"
    path = Path(path)
    config_bytes = _read_file(path, "adapter_config.json", label)
    config = _parse_config(config_bytes, label)
    weights_bytes = _read_file(path, "adapter_model.safetensors", label, max_bytes)
    digest = hashlib.sha256(config_bytes + b"\0" + weights_bytes).hexdigest()
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _parse_tensors(weights_bytes, label).items():
        match = _KEY.match(key[len(_PREFIX) :]) if key.startswith(_PREFIX) else None
        if match is None:
            raise AdapterError(
                f"{label}: unexpected tensor {_short(key)}; expected '{_PREFIX}<module>.lora_A.weight' / '.lora_B.weight'"
            )
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    if not pairs:
        raise AdapterError(f"{label}: adapter_model.safetensors holds no LoRA weights")

    modules = {}
    for module, ab in sorted(pairs.items()):
        modules[module] = _validate_module(label, module, ab, linears, config, dtype)
    return Adapter(name=name, path=str(path), modules=modules, digest=digest)


def _validate_module(label, module, ab, linears, config, dtype) -> LoRAWeights:
    if module not in linears:
        targets = sorted({m.rsplit(".", 1)[-1] for m in linears})
        raise AdapterError(
            f"{label}: adapter targets {_short(module)}, which is not a linear layer of the base model "
            f"(adaptable layers end in {targets})"
        )
    if set(ab) != {"A", "B"}:
        raise AdapterError(f"{label}: {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
    a, b = ab["A"], ab["B"]
    shape = linears[module]
    rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    expected_a, expected_b = (rank, shape.in_features), (shape.out_features, rank)
    if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
        raise AdapterError(
            f"{label}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; the base layer "
            f"({shape.in_features} -> {shape.out_features}) with r={rank} needs {expected_a} and {expected_b}"
        )
    if not (a.is_floating_point() and b.is_floating_point()):
        raise AdapterError(f"{label}: {module} has {a.dtype} / {b.dtype} LoRA weights, expected floating point")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise AdapterError(f"{label}: {module} has non-finite LoRA weights")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoRAWeights(a=a.to(dtype).contiguous(), b=b.to(dtype).contiguous(), scale=float(scale))


class AdapterStore:
    """Registered adapters by name, in host memory. Not thread-safe; the engine serialises access.

    Adapters whose files are identical (same SHA-256 of config and weights) share one copy of the
    weights, however many names they are registered under. ``max_bytes`` (None: unbounded) caps the
    host memory of all registered weights, each distinct copy counted once.
    """

    def __init__(self, linears: dict[str, LinearShape], dtype: torch.dtype, max_bytes: int | None = None):
        self.linears = linears
        self.dtype = dtype
        self.max_bytes = max_bytes
        self._adapters: dict[str, Adapter] = {}
        self._copies: dict[str, tuple[dict[str, LoRAWeights], int]] = {}  # digest -> (modules, users)

    @property
    def host_bytes(self) -> int:
        """Host memory taken by the registered adapters' weights (shared copies counted once)."""
        return sum(_nbytes(modules) for modules, _ in self._copies.values())

    def load(self, name: str, path: str | Path) -> Adapter:
        """Read and validate an adapter; the store is unchanged (call ``add``) so a failure disturbs nothing."""
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
            raise AdapterError(f"adapter name must be a string of 1 to {MAX_NAME_LENGTH} characters")
        if name in self._adapters:
            raise AdapterError(f"adapter {name!r} is already registered")
        left = None if self.max_bytes is None else self.max_bytes - self.host_bytes
        # Conversions to the store's dtype can at most quarter a file (float64 -> 16-bit), so a file over
        # four times what is left can never fit: refuse it before reading it.
        return load_peft_adapter(name, path, self.linears, self.dtype, None if left is None else 4 * max(left, 0))

    def add(self, adapter: Adapter) -> Adapter:
        """Register a validated adapter; returns it as stored (sharing the weights of an identical one).

        Raises ``AdapterError`` if the name is taken or its weights would exceed ``max_bytes``.
        """
        if adapter.name in self._adapters:
            raise AdapterError(f"adapter {adapter.name!r} is already registered")
        if adapter.digest in self._copies:
            modules, users = self._copies[adapter.digest]
            adapter = dataclasses.replace(adapter, modules=modules)
        else:
            size, used = _nbytes(adapter.modules), self.host_bytes
            if self.max_bytes is not None and used + size > self.max_bytes:
                raise AdapterError(
                    f"adapter {adapter.name!r} needs {size / 2**20:.2f} MiB of host memory; "
                    f"{used / 2**20:.2f} of the {self.max_bytes / 2**20:.2f} MiB for adapters are in use "
                    "(unload adapters or raise the limit)"
                )
            modules, users = adapter.modules, 0
        self._copies[adapter.digest] = (modules, users + 1)
        self._adapters[adapter.name] = adapter
        return adapter

    def remove(self, name: str) -> Adapter:
        """Unregister and return adapter ``name``."""
        adapter = self._adapters.pop(self._require(name))
        modules, users = self._copies[adapter.digest]
        if users == 1:
            del self._copies[adapter.digest]
        else:
            self._copies[adapter.digest] = (modules, users - 1)
        return adapter

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
            raise KeyError(f"unknown adapter {_short(name)}; registered: {len(self._adapters)} adapters")
        return name


def _nbytes(modules: dict[str, LoRAWeights]) -> int:
    return sum(w.a.nbytes + w.b.nbytes for w in modules.values())
