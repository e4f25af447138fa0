"""Options of fine-tuning on a serving engine, shared by the API process and the engine's trainer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

OPTIMIZERS = ("fp8adamw", "adamw")


@dataclass(frozen=True)
class FineTuningConfig:
    """Where files and jobs live and how jobs train beside inference.

    ``root`` holds ``files/`` and ``jobs/`` (a server restarted on the same root resumes its jobs).
    ``max_file_bytes`` bounds one uploaded file. ``checkpoint_every`` optimizer steps a job's adapter,
    optimizer and data position are saved. ``base_learning_rate`` times a job's
    ``learning_rate_multiplier`` is its learning rate; ``optimizer`` is ``fp8adamw`` (moeplug's FP8AdamW)
    or ``adamw``. ``slo_ttft_s`` / ``slo_itl_s`` (None: no target) bound how long training may stretch an
    idle step (a request arriving waits for it) and a step with running requests (their inter-token latency).
    """

    root: Path
    max_file_bytes: int = 64 * 2**20
    checkpoint_every: int = 10
    base_learning_rate: float = 2e-4
    optimizer: str = "fp8adamw"
    slo_ttft_s: float | None = None
    slo_itl_s: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))
        if not isinstance(self.max_file_bytes, int) or self.max_file_bytes < 1:
            raise ValueError(f"max_file_bytes must be a positive integer, got {self.max_file_bytes!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be a positive integer, got {self.checkpoint_every!r}")
        if not self.base_learning_rate > 0:
            raise ValueError(f"base_learning_rate must be positive, got {self.base_learning_rate!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("slo_ttft_s", "slo_itl_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive seconds or None, got {value!r}")

    @property
    def files_dir(self) -> Path:
        """Where uploaded files live."""
        return self.root / "files"

    @property
    def jobs_dir(self) -> Path:
        """Where jobs live."""
        return self.root / "jobs"
