"""Reading a PEFT LoRA adapter directory: its files, its config's options, its safetensors; ``AdapterError``.

Used by ``adapter_store.py``, which checks the tensors against the base model. Errors name the adapter,
the file and the offending value, never the server's directories.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load

UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias terms",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "layer_replication": "layer replication",
}


class AdapterError(ValueError):
    """An adapter cannot be registered: bad files, unsupported options, or a mismatch with the base model."""


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name suffix (as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def short(value) -> str:
    """A repr for error messages, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def read_file(path: Path, name: str, label: str, max_bytes: int | None = None) -> bytes:
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


def parse_config(data: bytes, label: str) -> dict:
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
        raise AdapterError(f"{where}: peft_type is {short(config.get('peft_type'))}, expected 'LORA'")
    for option, what in UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise AdapterError(f"{where}: {what} is not supported ({option}={short(config[option])})")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{where}: bias={short(config['bias'])} is not supported, expected 'none'")
    for field_name in ("r", "lora_alpha"):
        if not positive_number(config.get(field_name)):
            raise AdapterError(f"{where}: {field_name} must be a positive number, got {short(config.get(field_name))}")
    for field_name in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(field_name) or {}
        if not isinstance(patterns, dict):
            raise AdapterError(f"{where}: {field_name} must be an object of regex -> number, got {short(patterns)}")
        for key, value in patterns.items():
            try:
                re.compile(rf"(.*\.)?{key}$")
            except re.error as err:
                raise AdapterError(f"{where}: {field_name} key {short(key)} is not a valid regex ({err})") from None
            if not positive_number(value):
                raise AdapterError(f"{where}: {field_name}[{short(key)}] must be a positive number, got {short(value)}")
    return config


def parse_tensors(data: bytes, label: str) -> dict[str, torch.Tensor]:
    try:
        return safetensors_load(data)
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise AdapterError(f"{label}: cannot read adapter_model.safetensors ({short(str(err))})") from None
