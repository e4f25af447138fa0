"""A compressed adapter collection: its PEFT inputs, its in-memory form and its files on disk.

On disk, a directory with

* ``collection.json``: ``{"format": "lora_serve.compressed/1", "base_model_name_or_path", "rank",
  "modules": {module: [in, out]}, "groups": [[adapter names]...], "errors": {name: {"relative_error",
  "per_module"}}, "sources": {name: path}}``;
* ``collection.safetensors``: per group ``g`` and adapted linear ``m``: ``g{g}.{m}.U [out, c]`` and
  ``g{g}.{m}.V [in, c]`` (orthonormal columns) and ``g{g}.{m}.cores [n_g, c, c]`` (the group's adapters in
  the order listed, the LoRA scale folded in), so adapter ``j`` of group ``g`` has ``ΔW = U cores[j] V^T``.

``read_adapters`` reads the PEFT directories to compress and refuses, naming the adapter and the reason,
a set that does not share one base (``base_model_name_or_path``, or a layer's shape) and the same target
linears, or one with LoRA on parameters (not compressed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .adapter_store import Adapter, LinearShape, load_peft_adapter
from .peft_files import AdapterError, parse_config, read_file, short

FORMAT = "lora_serve.compressed/1"
_PREFIX = "base_model.model."


@dataclass
class Group:
    """Adapters sharing one pair of bases per layer: ``bases[m] = (U [out, c], V [in, c])``, ``cores[m] [n, c, c]``."""

    names: list[str]
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]]
    cores: dict[str, torch.Tensor]


@dataclass
class CompressedCollection:
    """Adapters compressed into groups with shared bases (see ``compress.py``), with per-adapter errors."""

    base_model: str | None
    rank: int | str
    groups: list[Group]
    errors: dict[str, dict] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def modules(self) -> dict[str, LinearShape]:
        """The adapted linears and their shapes."""
        return {m: LinearShape(v.shape[0], u.shape[0]) for m, (u, v) in self.groups[0].bases.items()}

    def names(self) -> list[str]:
        """Every adapter of the collection, group by group."""
        return [name for group in self.groups for name in group.names]

    def save(self, path: str | Path) -> None:
        """Write ``collection.json`` and ``collection.safetensors`` into the new directory ``path``."""
        path = Path(path)
        path.mkdir(parents=True)
        tensors = {}
        for g, group in enumerate(self.groups):
            for m, (u, v) in group.bases.items():
                tensors |= {f"g{g}.{m}.U": u, f"g{g}.{m}.V": v, f"g{g}.{m}.cores": group.cores[m]}
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(path / "collection.safetensors"))
        meta = {"format": FORMAT, "base_model_name_or_path": self.base_model, "rank": self.rank,
                "modules": {m: [s.in_features, s.out_features] for m, s in self.modules.items()},
                "groups": [g.names for g in self.groups], "errors": self.errors, "sources": self.sources}
        (path / "collection.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> CompressedCollection:
        """Read a collection directory; ``AdapterError`` naming the file and what is wrong."""
        path = Path(path)
        label = f"adapter collection {short(path.name)}"
        try:
            meta = json.loads(read_file(path, "collection.json", label))
            tensors = load_file(str(path / "collection.safetensors"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
            raise AdapterError(f"{label}: cannot read it ({short(str(err))})") from None
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise AdapterError(f"{label}: cannot read collection.safetensors ({short(str(err))})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise AdapterError(f"{label}: collection.json format is {short(meta.get('format') if isinstance(meta, dict) else meta)}, expected {FORMAT!r}")
        groups = []
        for g, names in enumerate(meta["groups"]):
            try:
                bases = {m: (tensors[f"g{g}.{m}.U"], tensors[f"g{g}.{m}.V"]) for m in meta["modules"]}
                cores = {m: tensors[f"g{g}.{m}.cores"] for m in meta["modules"]}
            except KeyError as err:
                raise AdapterError(f"{label}: collection.safetensors has no {err.args[0]!r}") from None
            for m, (u, v) in bases.items():
                c = u.shape[1]
                if v.shape[1] != c or tuple(cores[m].shape) != (len(names), c, c):
                    raise AdapterError(f"{label}: group {g} {m}: U {tuple(u.shape)}, V {tuple(v.shape)} and cores "
                                       f"{tuple(cores[m].shape)} do not fit {len(names)} adapters of one shared rank")
            groups.append(Group(list(names), bases, cores))
        return cls(meta.get("base_model_name_or_path"), meta.get("rank"), groups, meta.get("errors", {}),
                   meta.get("sources", {}))


def _linears_in(path: Path, label: str) -> dict[str, LinearShape]:
    """The linears an adapter directory's safetensors adapts and their shapes, read from the header only."""
    shapes: dict[str, dict[str, list[int]]] = {}
    file = path / "adapter_model.safetensors"
    if not file.is_file():
        raise AdapterError(f"{label}: no adapter_model.safetensors (expected a PEFT LoRA adapter directory)")
    try:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                module, _, which = key.removeprefix(_PREFIX).rpartition(".lora_")
                shapes.setdefault(module, {})[which] = f.get_slice(key).get_shape()
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise AdapterError(f"{label}: cannot read adapter_model.safetensors ({short(str(err))})") from None
    return {m: LinearShape(s["A.weight"][1], s["B.weight"][0]) for m, s in shapes.items()
            if "A.weight" in s and "B.weight" in s}


def _shape(linears: dict[str, LinearShape], module: str) -> str:
    shape = linears.get(module)
    return "not adapted" if shape is None else f"{shape.in_features} -> {shape.out_features}"


def read_adapters(paths: dict[str, str | Path]) -> tuple[dict[str, Adapter], str | None]:
    """Read the PEFT adapters ``name -> directory`` to compress into one collection: ``(adapters, base name)``.

    Raises ``AdapterError`` when they do not share a base model and the same target linears (naming the
    adapter that differs from the first and how), or when one targets parameters (MoE experts, routers).
    """
    if not paths:
        raise AdapterError("no adapters to compress")
    adapters, first, base = {}, None, None
    for name, path in paths.items():
        path, label = Path(path), f"adapter {short(name)}"
        config = parse_config(read_file(path, "adapter_config.json", label), label)
        if config.get("target_parameters"):
            raise AdapterError(f"{label}: LoRA on parameters ({short(config['target_parameters'])}) is not compressed; "
                               "compress adapters of linear layers only")
        linears = _linears_in(path, label)
        if first is None:
            first, base = (name, linears), config.get("base_model_name_or_path")
        elif config.get("base_model_name_or_path") != base:
            raise AdapterError(f"{label} was trained on base model {short(config.get('base_model_name_or_path'))}, "
                               f"but {short(first[0])} on {short(base)}: a collection shares one base model")
        elif linears != first[1]:
            module = min(m for m in {*linears, *first[1]} if linears.get(m) != first[1].get(m))
            raise AdapterError(f"{label} and {short(first[0])} differ at {module}: {_shape(linears, module)} vs "
                               f"{_shape(first[1], module)}; a collection's adapters target the same linears of one base")
        adapters[name] = load_peft_adapter(name, path, linears, torch.float32)
    return adapters, base
