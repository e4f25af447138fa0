"""OpenAI-compatible HTTP server for ``lora_serve``: the request's ``model`` names an adapter or the base model."""

from .app import create_app
from .config import ServerConfig

__all__ = ["ServerConfig", "create_app"]
