"""Where the conformance lane hooks into transformers: the default experts implementation, and patching.

Two modes, chosen per process by `MOEPLUG_CONFORMANCE_MODE`:

- ``eager``: unpatched transformers. The default experts implementation becomes ``"eager"`` instead of
  ``"grouped_mm"`` (transformers' CPU grouped_mm rejects these tiny sizes with "strides should be multiple
  of 16 bytes", a limit of this environment that must not become the baseline). A test that asks for an
  implementation explicitly still gets it.
- ``patched``: the same, and every model of the tested families is passed to `moeplug.patch_model` (no
  options: the drop-in) as soon as the outermost model exists, i.e.
    * at the end of the outermost model class `__init__` (direct construction, `from_config`,
      `_from_config`, construction under `torch.device("meta")`, ...): nested constructions (the base
      model inside a `...ForCausalLM`) are counted, only the outermost one is patched;
    * after `from_pretrained` returns (the model is *not* patched while transformers loads it; users
      patch what `from_pretrained` gave them).
  `PATCHED` counts the models patched during the current test (the report flags tests that patched none).
"""

from __future__ import annotations

import functools
import importlib
import os
import threading

from transformers import PreTrainedModel

MODES = ("eager", "patched")
PATCHED = {"count": 0}
_local = threading.local()
_installed: dict = {}


def mode() -> str:
    value = os.environ.get("MOEPLUG_CONFORMANCE_MODE", "eager")
    if value not in MODES:
        raise ValueError(f"MOEPLUG_CONFORMANCE_MODE={value!r}; expected one of {MODES}")
    return value


def _depth() -> int:
    return getattr(_local, "depth", 0)


def _patch(model, families) -> None:
    import moeplug

    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) in families and getattr(model, "_moeplug", None) is None:
        moeplug.patch_model(model)
        PATCHED["count"] += 1


def _wrap_init(cls, families) -> None:
    original = cls.__init__
    if getattr(original, "_moeplug_conformance", False) and "__init__" in cls.__dict__:
        return

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        _local.depth = _depth() + 1
        try:
            original(self, *args, **kwargs)
        finally:
            _local.depth -= 1
        if _local.depth == 0 and not getattr(_local, "loading", False):
            _patch(self, families)

    __init__._moeplug_conformance = True
    cls.__init__ = __init__


def _model_classes(family: str) -> list[type]:
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    return [getattr(module, name) for name in module.__all__
            if isinstance(getattr(module, name), type) and issubclass(getattr(module, name), PreTrainedModel)]


def install(families) -> str:
    """Install the seam of this process's mode for `families` (idempotent); return the mode."""
    current = mode()
    if _installed:
        return current
    original_default = PreTrainedModel.get_correct_experts_implementation

    @functools.wraps(original_default)
    def get_correct_experts_implementation(self, requested_experts):
        return original_default(self, "eager" if requested_experts is None else requested_experts)

    PreTrainedModel.get_correct_experts_implementation = get_correct_experts_implementation
    _installed["default"] = original_default
    if current == "patched":
        families = tuple(families)
        for family in families:
            for cls in _model_classes(family):
                _wrap_init(cls, families)
        original_from_pretrained = PreTrainedModel.from_pretrained.__func__

        @functools.wraps(original_from_pretrained)
        def from_pretrained(cls, *args, **kwargs):
            outer = not getattr(_local, "loading", False)
            _local.loading = True
            try:
                model = original_from_pretrained(cls, *args, **kwargs)
            finally:
                if outer:
                    _local.loading = False
            if outer:
                _patch(model, families)
            return model

        PreTrainedModel.from_pretrained = classmethod(from_pretrained)
    return current
