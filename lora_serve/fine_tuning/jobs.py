"""``JobStore``: fine-tuning jobs on disk, shared by the API process and the engine that trains them.

One directory per job, ``<root>/<job id>/``, with one writer per file so the two processes never race:

=====================  ===========  ==========================================================================
file                   written by   what
=====================  ===========  ==========================================================================
``spec.json``          API          the request: base model, files, seed, hyperparameters, LoRA options
``train.jsonl``        API          a copy of the training file (deleting the upload leaves the job intact)
``valid.jsonl``        API          a copy of the validation file, if any
``state.json``         API once,    status, trained tokens, step, error; the API writes the first
                       then engine  (``validating_files``), the engine every later one
``cancel``             API          present once a cancel was asked for
``events.jsonl``       both         one event per line (appends are atomic for lines this short)
``checkpoints/N/``     engine       the PEFT adapter after optimizer step N, the optimizer and data position
``adapter/``           engine       the final PEFT adapter
=====================  ===========  ==========================================================================

Status: ``validating_files`` -> ``queued`` -> ``running`` -> ``succeeded`` | ``failed`` | ``cancelled``.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .files import write_atomic

ACTIVE = ("validating_files", "queued", "running")
FINISHED = ("succeeded", "failed", "cancelled")
_ID = re.compile(r"^ftjob-[0-9a-f]{24}$")


@dataclass(frozen=True)
class JobState:
    """The mutable part of a job."""

    status: str = "validating_files"
    trained_tokens: int = 0
    step: int = 0
    total_steps: int | None = None
    error: dict | None = None  # {"code", "message", "param"}
    finished_at: int | None = None

    def finish(self, status: str, error: dict | None = None) -> JobState:
        """This state ended with ``status`` (one of ``FINISHED``) now."""
        return replace(self, status=status, error=error, finished_at=int(time.time()))


@dataclass(frozen=True)
class JobSpec:
    """What a job was asked to do (immutable once created)."""

    id: str
    created_at: int
    model: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    seed: int
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    lora: dict = field(default_factory=dict)  # {"r", "alpha", "target_modules"}

    @property
    def fine_tuned_model(self) -> str:
        """The model name the trained adapter is served as: ``ft:<base>:<suffix>:<job id>``."""
        return f"ft:{self.model}:{self.suffix or ''}:{self.id}"


class JobStore:
    """Jobs under ``root`` (created if missing)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def new_id() -> str:
        """A fresh job id."""
        return f"ftjob-{secrets.token_hex(12)}"

    def create(self, spec: JobSpec, train: bytes, valid: bytes | None) -> None:
        """Write a new job (status ``validating_files``) with its copies of the data files."""
        path = self.root / spec.id
        path.mkdir()
        write_atomic(path / "train.jsonl", train)
        if valid is not None:
            write_atomic(path / "valid.jsonl", valid)
        write_atomic(path / "spec.json", json.dumps(asdict(spec)).encode())
        self.write_state(spec.id, JobState())
        self.event(spec.id, f"Created fine-tuning job: {spec.id}")

    def dir(self, job_id: str) -> Path:
        """The job's directory; ``KeyError`` for an id that is malformed or unknown."""
        if not isinstance(job_id, str) or not _ID.match(job_id) or not (self.root / job_id / "spec.json").is_file():
            raise KeyError(job_id)
        return self.root / job_id

    def spec(self, job_id: str) -> JobSpec:
        """The job's request."""
        return JobSpec(**json.loads((self.dir(job_id) / "spec.json").read_text()))

    def state(self, job_id: str) -> JobState:
        """The job's current state."""
        return JobState(**json.loads((self.dir(job_id) / "state.json").read_text()))

    def write_state(self, job_id: str, state: JobState) -> None:
        """Replace the job's state (atomically)."""
        write_atomic(self.root / job_id / "state.json", json.dumps(asdict(state)).encode())

    def ids(self) -> list[str]:
        """Every job id, oldest first."""
        found = [p.parent.name for p in self.root.glob("ftjob-*/spec.json") if _ID.match(p.parent.name)]
        return sorted(found, key=lambda job_id: (self.spec(job_id).created_at, job_id))

    def request_cancel(self, job_id: str) -> None:
        """Mark the job for cancelling (the engine ends it at its next step)."""
        (self.dir(job_id) / "cancel").touch()

    def cancel_requested(self, job_id: str) -> bool:
        """Whether a cancel was asked for."""
        return (self.root / job_id / "cancel").exists()

    def event(self, job_id: str, message: str, level: str = "info", data: dict | None = None) -> None:
        """Append an event to the job's log."""
        record = {"id": f"ftevent-{secrets.token_hex(12)}", "created_at": int(time.time()), "level": level,
                  "message": message, "data": data, "type": "metrics" if data else "message"}
        with open(self.root / job_id / "events.jsonl", "a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")

    def events(self, job_id: str) -> list[dict]:
        """The job's events, newest first (as OpenAI lists them)."""
        path = self.dir(job_id) / "events.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        return [json.loads(line) for line in reversed(lines) if line.strip()]

    def checkpoint_dir(self, job_id: str, step: int) -> Path:
        """Where the checkpoint after optimizer step ``step`` lives."""
        return self.root / job_id / "checkpoints" / f"{step:08d}"

    def checkpoints(self, job_id: str) -> list[tuple[int, Path]]:
        """The job's complete checkpoints as ``(step, directory)``, newest first."""
        parent = self.dir(job_id) / "checkpoints"
        found = [(int(p.name), p) for p in parent.glob("*") if p.name.isdigit() and (p / "meta.json").is_file()]
        return sorted(found, reverse=True)

    def adapter_dir(self, job_id: str) -> Path:
        """Where the final adapter is written."""
        return self.root / job_id / "adapter"
