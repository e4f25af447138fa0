"""Host-side store of LoRA adapters read from PEFT directories, validated against the base model.

Every registered adapter lives here (host memory) whether or not it is in the page pool; the pool only
holds the ones in use (see ``residency.py``). Loading reads ``adapter_config.json`` and
``adapter_model.safetensors`` as PEFT writes them and checks every tensor against the base model's
linear layers before anything is registered, so a bad adapter never disturbs the loaded ones.

LoRA on parameters (PEFT's ``target_parameters``) is read for fused MoE experts (``mlp.experts.gate_up_proj``,
``down_proj``) and MoE routers (``mlp.gate.weight``, a 2-D weight adapted like a linear, ``router_lora.py``).
PEFT wraps each targeted parameter of a module in a ``ParamWrapper``, nested in the order the module
registers its parameters (the first one innermost), and saves the wrapper of the i-th of n targeted
parameters as ``<module>`` + ``.base_layer`` * (n - 1 - i) + ``.lora_A.weight`` / ``.lora_B.weight``. For
experts, ``A [r*E, in]`` is expert-major (``[E, r, in]``) but ``B [out, r*E]`` has the experts last
(``[out, r, E]``; see PEFT's ``ParamWrapper.get_delta_weight``). They are stored here under the parameter's
name (``...mlp.experts.gate_up_proj``, the key PEFT's rank_pattern matches), experts as ``A [E, r, in]`` and
``B [E, out, r]``, so ``ΔW_e = scale · B[e] @ A[e]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .peft_files import AdapterError, parse_config, parse_tensors, pattern_value, read_file, short

MAX_NAME_LENGTH = 256  # characters of an adapter name
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


@dataclass(frozen=True)
class LinearShape:
    """A base-model linear layer LoRA may target: ``y = x W^T`` with ``W [out_features, in_features]``."""

    in_features: int
    out_features: int


@dataclass(frozen=True)
class ExpertsShape:
    """A fused experts parameter LoRA may target: ``num_experts`` projections, each ``in_features -> out_features``."""

    num_experts: int
    in_features: int
    out_features: int


@dataclass(frozen=True)
class LoRAWeights:
    """One adapted linear: ``A [rank, in]``, ``B [out, rank]`` and the scale applied to ``x A^T B^T``; for a fused
    experts parameter, one such pair per expert: ``A [E, rank, in]``, ``B [E, out, rank]``."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        """The LoRA rank of this module."""
        return self.a.shape[-2]

    @property
    def nbytes(self) -> int:
        """Host bytes of A and B."""
        return self.a.nbytes + self.b.nbytes


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


ParamShapes = dict[str, dict[str, "ExpertsShape | LinearShape"]]  # module -> LoRA-able parameter -> shape


def _parameter_keys(label: str, config: dict, parameters: ParamShapes) -> dict[str, str]:
    """The module key PEFT saves each targeted parameter under -> the parameter's name.

    ``parameters`` maps each module of the base with LoRA-able parameters (experts, routers) to them, in
    registration order. Every ``target_parameters`` entry must name such a parameter (PEFT matches
    ``name == entry`` or a ``.entry`` suffix); anything else is refused, naming the entry and what is served.
    """
    targets = config.get("target_parameters") or []
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise AdapterError(
            f"{label}: adapter_config.json: target_parameters must be a list of names, got {short(targets)}"
        )
    matches = lambda key: any(key == t or key.endswith(f".{t}") for t in targets)  # noqa: E731  PEFT's rule
    keys = {}
    for module, params in parameters.items():
        targeted = [p for p in params if matches(f"{module}.{p}")]
        for i, param in enumerate(targeted):
            keys[module + ".base_layer" * (len(targeted) - 1 - i)] = f"{module}.{param}"
    for target in targets:
        if not any(param == target or param.endswith(f".{target}") for param in keys.values()):
            served = sorted({f"{m.rsplit('.', 1)[-1]}.{p}" for m, params in parameters.items() for p in params})
            raise AdapterError(
                f"{label}: target_parameters entry {short(target)} names no expert or router parameter of the base "
                f"model (LoRA on parameters is served for {served or 'none: this base has no MoE layers'})"
            )
    return keys


def load_peft_adapter(
    name: str,
    path: str | Path,
    linears: dict[str, LinearShape],
    dtype: torch.dtype,
    max_bytes: int | None = None,
    parameters: ParamShapes | None = None,
) -> Adapter:
    """Read and validate the PEFT LoRA adapter in directory ``path`` against the base model's ``linears`` and
    LoRA-able ``parameters`` (module -> parameter -> shape, in registration order: MoE experts and routers).

    Raises ``AdapterError`` naming the adapter, the offending file, key or value and what was expected
    (never the server's directories). A weights file over ``max_bytes`` is refused before it is read.
    """
    label = f"adapter {short(name)}"
    path = Path(path)
    config_bytes = read_file(path, "adapter_config.json", label)
    config = parse_config(config_bytes, label)
    weights_bytes = read_file(path, "adapter_model.safetensors", label, max_bytes)
    digest = hashlib.sha256(config_bytes + b"\0" + weights_bytes).hexdigest()
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in parse_tensors(weights_bytes, label).items():
        match = _KEY.match(key[len(_PREFIX) :]) if key.startswith(_PREFIX) else None
        if match is None:
            raise AdapterError(
                f"{label}: unexpected tensor {short(key)}; expected '{_PREFIX}<module>.lora_A.weight' / '.lora_B.weight'"
            )
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    if not pairs:
        raise AdapterError(f"{label}: adapter_model.safetensors holds no LoRA weights")

    param_keys = _parameter_keys(label, config, parameters or {})
    missing = sorted(set(param_keys) - set(pairs))
    if missing:
        raise AdapterError(
            f"{label}: target_parameters covers {param_keys[missing[0]]!r}, but adapter_model.safetensors has no "
            f"'{_PREFIX}{missing[0]}.lora_A.weight' / '.lora_B.weight'"
        )
    modules = {}
    for module, ab in sorted(pairs.items()):
        if module in param_keys:  # stored under the parameter's name, the key PEFT's rank_pattern matches
            param = param_keys[module]
            owner, _, attribute = param.rpartition(".")
            shape = parameters[owner][attribute]
            if isinstance(shape, ExpertsShape):
                modules[param] = _validate_experts(label, module, param, ab, shape, config, dtype)
            else:
                modules[param] = _validate_linear(label, module, param, ab, shape, config, dtype)
        elif module in linears:
            modules[module] = _validate_linear(label, module, module, ab, linears[module], config, dtype)
        else:
            targets = sorted({m.rsplit(".", 1)[-1] for m in linears})
            raise AdapterError(
                f"{label}: adapter targets {short(module)}, which is not a linear layer of the base model "
                f"(adaptable layers end in {targets})"
            )
    return Adapter(name=name, path=str(path), modules=modules, digest=digest)


def _rank_and_scale(config: dict, key: str) -> tuple[int, float]:
    """PEFT's rank and scale of the module (or parameter) ``key``: rank/alpha patterns, then rsLoRA or alpha / r."""
    rank = pattern_value(config.get("rank_pattern") or {}, key, config["r"])
    alpha = pattern_value(config.get("alpha_pattern") or {}, key, config["lora_alpha"])
    return rank, float(alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank)


def _check_values(label: str, module: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if not (a.is_floating_point() and b.is_floating_point()):
        raise AdapterError(f"{label}: {module} has {a.dtype} / {b.dtype} LoRA weights, expected floating point")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise AdapterError(f"{label}: {module} has non-finite LoRA weights")


def _validate_experts(label, module, param, ab, shape: ExpertsShape, config, dtype) -> LoRAWeights:
    """One fused experts parameter's LoRA, checked against its shape and laid out per expert (module docstring)."""
    if set(ab) != {"A", "B"}:
        raise AdapterError(f"{label}: {module} ({param}) has lora_{''.join(ab)} but not both lora_A and lora_B")
    a, b = ab["A"], ab["B"]
    rank, scale = _rank_and_scale(config, param)
    e = shape.num_experts
    expected_a, expected_b = (rank * e, shape.in_features), (shape.out_features, rank * e)
    if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
        raise AdapterError(
            f"{label}: {module}.lora_A.weight {tuple(a.shape)} / .lora_B.weight {tuple(b.shape)} do not fit {param} "
            f"({e} experts, {shape.in_features} -> {shape.out_features}) with r={rank}: expected {expected_a} "
            f"and {expected_b}"
        )
    _check_values(label, module, a, b)
    a = a.reshape(e, rank, shape.in_features)
    b = b.reshape(shape.out_features, rank, e).permute(2, 0, 1)
    return LoRAWeights(a=a.to(dtype).contiguous(), b=b.to(dtype).contiguous(), scale=scale)


def _validate_linear(label, module, key, ab, shape: LinearShape, config, dtype) -> LoRAWeights:
    """One linear's (or router weight's) LoRA, checked against its shape; ``key`` is the name rank/alpha
    patterns match (the module, or the parameter for ``target_parameters``)."""
    if set(ab) != {"A", "B"}:
        raise AdapterError(f"{label}: {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
    a, b = ab["A"], ab["B"]
    rank, scale = _rank_and_scale(config, key)
    expected_a, expected_b = (rank, shape.in_features), (shape.out_features, rank)
    if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
        raise AdapterError(
            f"{label}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; the base layer "
            f"({shape.in_features} -> {shape.out_features}) with r={rank} needs {expected_a} and {expected_b}"
        )
    _check_values(label, module, a, b)
    return LoRAWeights(a=a.to(dtype).contiguous(), b=b.to(dtype).contiguous(), scale=scale)


class AdapterStore:
    """Registered adapters by name, in host memory. Not thread-safe; the engine serialises access.

    Adapters whose files are identical (same SHA-256 of config and weights) share one copy of the
    weights, however many names they are registered under. ``max_bytes`` (None: unbounded) caps the
    host memory of all registered weights, each distinct copy counted once.
    """

    def __init__(
        self,
        linears: dict[str, LinearShape],
        dtype: torch.dtype,
        max_bytes: int | None = None,
        parameters: ParamShapes | None = None,
    ):
        self.linears = linears
        self.parameters = parameters or {}
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
        limit = None if left is None else 4 * max(left, 0)
        return load_peft_adapter(name, path, self.linears, self.dtype, limit, self.parameters)

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
            raise KeyError(f"unknown adapter {short(name)}; registered: {len(self._adapters)} adapters")
        return name


def _nbytes(modules: dict[str, LoRAWeights]) -> int:
    return sum(w.nbytes for w in modules.values())
