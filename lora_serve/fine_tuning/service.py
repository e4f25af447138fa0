"""``FineTuningService``: the API process's side of fine-tuning: files, job creation, cancel, and serving
each finished job's adapter.

Jobs train in the engine (``cosched.FineTuner``); this side writes requests into the ``JobStore`` and wakes
the engine. A watcher task registers every succeeded job's adapter with the engine under its
``fine_tuned_model`` name (also after a restart), and a job reports ``succeeded`` only once its model is
served, so a client that sees ``succeeded`` can query it at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from ..adapter_store import AdapterError
from .config import FineTuningConfig
from .files import FileStore
from .jobs import FINISHED, JobSpec, JobStore

logger = logging.getLogger(__name__)

_WATCH_S = 0.2  # how often the watcher looks for newly succeeded jobs


class JobConflict(ValueError):
    """The job cannot do what was asked in its current status (e.g. cancel a finished job)."""


class FineTuningService:
    """Files and jobs under ``config.root`` for the engine wrapper ``engine`` serving base ``base_model``."""

    def __init__(self, engine, config: FineTuningConfig, base_model: str):
        self.engine, self.config, self.base_model = engine, config, base_model
        self.files = FileStore(config.files_dir, config.max_file_bytes)
        self.jobs = JobStore(config.jobs_dir)
        self._served: set[str] = set()  # fine-tuned models registered with the engine

    # ------------------------------------------------------------------ jobs
    def create_job(self, model: str, training_file: str, validation_file: str | None, suffix: str | None,
                   seed: int | None, hyperparameters: dict, lora: dict) -> dict:
        """Write a new job and wake the engine; ``KeyError(param)`` for an unknown file, ``ValueError`` for a
        model that is not the served base."""
        if model != self.base_model:
            raise ValueError(f"model {model!r} is not this server's base model {self.base_model!r}; fine-tuning "
                             "trains on the served base")
        data = {}
        for param, file_id in (("training_file", training_file), ("validation_file", validation_file)):
            if file_id is not None:
                try:
                    data[param] = self.files.content(file_id)
                except KeyError:
                    raise KeyError(param) from None
        job_id = JobStore.new_id()
        spec = JobSpec(id=job_id, created_at=int(time.time()), model=model, training_file=training_file,
                       validation_file=validation_file, suffix=suffix,
                       seed=seed if seed is not None else secrets.randbelow(2**31),
                       lora=lora, **hyperparameters)
        self.jobs.create(spec, data["training_file"], data.get("validation_file"))
        self.engine.wake_background()
        return self.job(job_id)

    async def cancel(self, job_id: str) -> dict:
        """Ask the engine to cancel the job and wait (briefly) for it to end; ``JobConflict`` if finished."""
        if self.jobs.state(job_id).status in FINISHED:
            raise JobConflict(f"job {job_id} has already {self.jobs.state(job_id).status}; only a job that is "
                              "validating files, queued or running can be cancelled")
        self.jobs.request_cancel(job_id)
        self.engine.wake_background()
        for _ in range(50):  # the engine ends it at its next step
            if self.jobs.state(job_id).status in FINISHED:
                break
            await asyncio.sleep(0.05)
        return self.job(job_id)

    def job(self, job_id: str) -> dict:
        """The job as OpenAI's ``fine_tuning.job`` object (``KeyError`` if unknown)."""
        spec, state = self.jobs.spec(job_id), self.jobs.state(job_id)
        status = state.status
        if status == "succeeded" and spec.fine_tuned_model not in self._served:
            status = "running"  # trained, but its model is not served yet
        return {
            "id": spec.id, "object": "fine_tuning.job", "created_at": spec.created_at, "model": spec.model,
            "status": status, "finished_at": state.finished_at if status in FINISHED else None,
            "fine_tuned_model": spec.fine_tuned_model if status == "succeeded" else None,
            "organization_id": "lora-serve", "result_files": [], "seed": spec.seed,
            "trained_tokens": state.trained_tokens if status == "succeeded" else None,
            "training_file": spec.training_file, "validation_file": spec.validation_file,
            "error": state.error, "estimated_finish": None, "integrations": [], "user_provided_suffix": spec.suffix,
            "hyperparameters": {"n_epochs": spec.n_epochs, "batch_size": spec.batch_size,
                                "learning_rate_multiplier": spec.learning_rate_multiplier, "lora": spec.lora},
            "method": {"type": "supervised"},
        }

    def list_jobs(self) -> list[dict]:
        """Every job, newest first."""
        return [self.job(job_id) for job_id in reversed(self.jobs.ids())]

    def checkpoints(self, job_id: str) -> list[dict]:
        """The job's checkpoints as OpenAI's ``fine_tuning.job.checkpoint`` objects, newest first."""
        spec = self.jobs.spec(job_id)
        found = []
        for step, path in self.jobs.checkpoints(job_id):
            meta = json.loads((path / "meta.json").read_text())
            found.append({
                "id": f"ftckpt-{job_id[6:]}-{step}", "object": "fine_tuning.job.checkpoint",
                "created_at": int(path.stat().st_mtime), "fine_tuning_job_id": job_id, "step_number": step,
                "fine_tuned_model_checkpoint": f"{spec.fine_tuned_model}:ckpt-step-{step}",
                "metrics": {k: v for k, v in meta.items() if k != "step" and v is not None} | {"step": step},
            })
        return found

    # ------------------------------------------------------------------ serving finished jobs
    async def watch(self) -> None:
        """Register each succeeded job's adapter with the engine (runs until cancelled)."""
        while True:
            for job_id in self.jobs.ids():
                spec = self.jobs.spec(job_id)
                if spec.fine_tuned_model in self._served or self.jobs.state(job_id).status != "succeeded":
                    continue
                await self._serve(job_id, spec)
            await asyncio.sleep(_WATCH_S)

    async def _serve(self, job_id: str, spec: JobSpec) -> None:
        try:
            if not self.engine.has_adapter(spec.fine_tuned_model):
                await self.engine.add_adapter(spec.fine_tuned_model, self.jobs.adapter_dir(job_id))
            self._served.add(spec.fine_tuned_model)
        except AdapterError as err:  # e.g. the adapter host memory is full: the job fails, visibly
            logger.error("cannot serve the adapter of job %s: %s", job_id, err)
            error = {"code": "serving_failed", "message": str(err), "param": None}
            self.jobs.write_state(job_id, self.jobs.state(job_id).finish("failed", error))
