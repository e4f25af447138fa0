"""Fine-tuning while serving: OpenAI's files and fine-tuning jobs API, with LoRA jobs trained inside the
serving engine on its own base weights, co-scheduled with inference (FlexLLM-style).

``FineTuningConfig`` (options), ``FineTuner`` (the engine side: attach with ``engine.attach_background``),
``FineTuningService`` (the API side: files, jobs, serving finished adapters).
"""

from .config import FineTuningConfig
from .cosched import FineTuner
from .service import FineTuningService

__all__ = ["FineTuner", "FineTuningConfig", "FineTuningService"]
