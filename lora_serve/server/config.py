"""Options of the HTTP server (the engine has its own ``EngineConfig``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..fine_tuning.config import FineTuningConfig


@dataclass(frozen=True)
class ServerConfig:
    """How the server names its model and guards its endpoints.

    ``model_name`` is the ``model`` value that selects the base model; ``model_path`` is reported in
    ``/v1/models``. Run-time adapter loads must lie under ``adapter_root`` (None disables them).
    ``api_key`` set means ``/v1/*`` needs ``Authorization: Bearer <api_key>``. ``default_max_tokens``
    bounds a chat completion that sets no ``max_tokens``. ``unload_timeout`` is how long an unload waits
    for the adapter's in-flight requests before aborting them. ``max_body_bytes`` bounds a request body
    (a 413 beyond it). ``fine_tuning`` set enables ``/v1/files`` and ``/v1/fine_tuning/jobs`` (uploads may be
    up to its ``max_file_bytes``).
    """

    model_name: str
    model_path: str = ""
    adapter_root: Path | None = None
    api_key: str | None = None
    default_max_tokens: int = 256
    unload_timeout: float = 30.0
    max_body_bytes: int = 4 * 2**20
    fine_tuning: FineTuningConfig | None = None

    def __post_init__(self):
        if not self.model_name:
            raise ValueError("model_name must be a non-empty string")
        if self.api_key == "":
            raise ValueError("api_key must be None (no authentication) or a non-empty string")
        if not isinstance(self.default_max_tokens, int) or self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be a positive integer, got {self.default_max_tokens!r}")
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be a positive integer, got {self.max_body_bytes!r}")
        if not self.unload_timeout >= 0:
            raise ValueError(f"unload_timeout must be >= 0 seconds, got {self.unload_timeout!r}")
