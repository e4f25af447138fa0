"""``FineTuner``: fine-tuning jobs co-scheduled with inference inside the engine's step loop (FlexLLM-style).

Attached to an ``Engine`` (``engine.attach_background``), it runs at the end of every ``Engine.step``, after
the step's inference work, with a ``StepReport`` of that work. It gives the running job one micro-batch of at
most ``training_budget(...)`` tokens: the step's unused token budget, cut further by the SLO targets
(``FineTuningConfig``, planned at ``HEADROOM`` of them) using the measured cost of training micro-batches
(``CostModel``): with requests running, to the time the ITL target leaves after the step's inference; idle, to
the TTFT target less an inference step or the ITL target, whichever is longer (a request arriving meanwhile
waits for the micro-batch, then for its first step). Waiting requests stop training for the step (their time
to first token comes first). With no inference at all the job gets the whole step budget, and always at least
one example, so it progresses on an idle server.

Jobs come from the ``JobStore``: ``wake()`` (the API created or cancelled a job) makes the next step scan it;
the first step scans too, so a restarted server resumes a ``running`` job from its latest checkpoint. One
job trains at a time, oldest first. A job that raises (bad data, a non-finite loss, a bug) ends ``failed``
with the reason; the engine keeps serving.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import replace

import torch

from ..engine import StepReport
from .config import FineTuningConfig
from .data import DataError, parse_jsonl, tokenize
from .jobs import ACTIVE, JobState, JobStore
from .trainer import LoRATrainer, TrainingError

logger = logging.getLogger(__name__)

# Steps are planned to this share of the SLO targets: a step's time varies (load, cache), and a plan at 100%
# would put about half of the steps, and of the requests' mean inter-token latencies, over the target.
HEADROOM = 0.75


class CostModel:
    """Seconds a training micro-batch of ``n`` tokens takes: ``fixed + per_token * n``, least squares over the
    last ``window`` micro-batches. A per-token average alone would charge small micro-batches' fixed cost
    (hooks, attention switch, Python) to every token and, in a time budget, keep them small."""

    def __init__(self, window: int = 32):
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)

    def add(self, tokens: int, seconds: float) -> None:
        """Record one micro-batch."""
        self.samples.append((tokens, seconds))

    def tokens_within(self, seconds: float) -> int | None:
        """Most tokens one micro-batch can run in ``seconds`` (None before any measurement)."""
        if not self.samples:
            return None
        n = torch.tensor([t for t, _ in self.samples], dtype=torch.float64)
        y = torch.tensor([s for _, s in self.samples], dtype=torch.float64)
        fixed, per_token = 0.0, float(y.sum() / n.sum())
        if n.unique().numel() > 1:  # two sizes at least: fit the line, keeping both terms non-negative
            slope = float(((n - n.mean()) * (y - y.mean())).sum() / ((n - n.mean()) ** 2).sum())
            if slope > 0:
                fixed, per_token = max(0.0, float(y.mean()) - slope * float(n.mean())), slope
        return int(max(0.0, seconds - fixed) / max(per_token, 1e-12))


def training_budget(report: StepReport, cost: int, config: FineTuningConfig, cost_model: CostModel,
                    inference_step_s: float = 0.0):
    """Tokens the job may run after this step's inference, or None to skip training this step.

    ``cost`` is the next example's size (a micro-batch holds at least one); ``inference_step_s`` is the recent
    time of an inference step.
    """
    idle = report.running == 0 and report.waiting == 0
    if report.waiting:
        return None
    limit = report.max_batch_tokens if idle else report.max_batch_tokens - report.inference_tokens
    itl = config.slo_itl_s and HEADROOM * config.slo_itl_s
    ttft = config.slo_ttft_s and HEADROOM * config.slo_ttft_s
    if idle:  # a request arriving now waits for the micro-batch, then for its first step (<= the ITL plan)
        spare = ttft and ttft - max(inference_step_s, itl or 0.0)
    else:
        spare = itl and itl - report.inference_seconds
    fits = None if spare is None else cost_model.tokens_within(spare)
    if fits is not None:
        limit = min(limit, fits)
    if idle:
        return max(limit, cost)
    return limit if limit >= cost else None


class FineTuner:
    """Trains the jobs of ``config.jobs_dir`` on ``engine``'s model between its inference steps."""

    def __init__(self, engine, config: FineTuningConfig):
        self.engine, self.config = engine, config
        self.jobs = JobStore(config.jobs_dir)
        self.current: tuple[str, LoRATrainer] | None = None
        self.cost = CostModel()
        self.inference_step_s = 0.0  # running mean of the steps that did inference work
        # What training got, by whether requests were running: micro-batches, tokens, seconds; steps skipped.
        self.stats = {f"{k}_{s}": 0 for k in ("micro_batches", "tokens", "seconds") for s in ("idle", "busy")}
        self.stats["skipped"] = 0
        self._wake = True

    def wake(self) -> None:
        """Scan the job store at the next step (a job was created or a cancel asked for)."""
        self._wake = True

    def has_work(self) -> bool:
        """Whether the engine should step for this tuner even without requests."""
        return self._wake or self.current is not None

    def after_step(self, report: StepReport) -> None:
        """The engine finished a step's inference work: scan if woken, then train one micro-batch if allowed."""
        if report.inference_tokens:
            self.inference_step_s = 0.8 * self.inference_step_s + 0.2 * report.inference_seconds
        if self._wake:
            self._wake = False
            self._scan()
        if self.current is None:
            return
        job_id, trainer = self.current
        try:
            if self.jobs.cancel_requested(job_id):
                self._end(job_id, "cancelled", "The job was cancelled")
                return
            budget = training_budget(report, trainer.next_cost(), self.config, self.cost, self.inference_step_s)
            if budget is None:
                self.stats["skipped"] += 1
            else:
                self._train(job_id, trainer, budget, "idle" if report.running == 0 else "busy")
        except Exception as err:  # noqa: BLE001 - the job fails, the engine goes on serving
            logger.exception("fine-tuning job %s failed", job_id)
            code = "training_error" if isinstance(err, (TrainingError, DataError)) else "internal_error"
            self._end(job_id, "failed", f"{type(err).__name__}: {err}", code)

    def _train(self, job_id: str, trainer: LoRATrainer, budget: int, phase: str) -> None:
        step = trainer.step
        start = time.perf_counter()
        tokens = trainer.run_micro_batch(budget)
        seconds = time.perf_counter() - start
        for key, value in (("micro_batches", 1), ("tokens", tokens), ("seconds", seconds)):
            self.stats[f"{key}_{phase}"] += value
        self.cost.add(tokens, seconds)
        if trainer.step == step:
            return
        state = self.jobs.state(job_id)
        self.jobs.write_state(job_id, replace(state, status="running", step=trainer.step,
                                              trained_tokens=trainer.trained_tokens))
        self.jobs.event(job_id, f"Step {trainer.step}/{trainer.total_steps}: training loss={trainer.last_loss:.4f}",
                        data={"step": trainer.step, "train_loss": trainer.last_loss,
                              "total_steps": trainer.total_steps})
        if trainer.step % self.config.checkpoint_every == 0 and not trainer.done:
            trainer.save_checkpoint(self.jobs.checkpoint_dir(job_id, trainer.step), {"train_loss": trainer.last_loss})
        if trainer.done:
            valid_loss = trainer.validation_loss()
            trainer.lora.save_peft(self.jobs.adapter_dir(job_id), trainer.spec.model)
            trainer.save_checkpoint(self.jobs.checkpoint_dir(job_id, trainer.step),
                                    {"train_loss": trainer.last_loss, "valid_loss": valid_loss})
            if valid_loss is not None:
                self.jobs.event(job_id, f"Validation loss={valid_loss:.4f}", data={"valid_loss": valid_loss})
            self._end(job_id, "succeeded", "The job has successfully completed")

    def _end(self, job_id: str, status: str, message: str, code: str | None = None) -> None:
        state = self.jobs.state(job_id)
        if self.current is not None and self.current[0] == job_id:
            state = replace(state, trained_tokens=self.current[1].trained_tokens)
            self.current = None
            self._wake = True  # the next queued job starts
        error = {"code": code, "message": message, "param": None} if status == "failed" else None
        self.jobs.write_state(job_id, state.finish(status, error))
        self.jobs.event(job_id, message, level="error" if error else "info")

    def _scan(self) -> None:
        for job_id in self.jobs.ids():
            state = self.jobs.state(job_id)
            if state.status not in ACTIVE or (self.current and self.current[0] == job_id):
                continue
            if self.jobs.cancel_requested(job_id):
                self._end(job_id, "cancelled", "The job was cancelled")
            elif state.status == "validating_files":
                self._validate(job_id)
        if self.current is None:
            waiting = [j for j in self.jobs.ids() if self.jobs.state(j).status in ("queued", "running")]
            if waiting:
                self._start(waiting[0])

    def _examples(self, job_id: str, name: str) -> list:
        path = self.jobs.dir(job_id) / name
        if not path.exists():
            return []
        examples = [tokenize(self.engine.tokenizer, record) for record in parse_jsonl(path.read_bytes())]
        limit = self.engine.max_context
        for number, example in enumerate(examples, 1):
            if limit is not None and len(example.input_ids) > limit:
                raise DataError(f"{name}: example {number} has {len(example.input_ids)} tokens, more than the "
                                f"model's context of {limit}")
        return examples

    def _validate(self, job_id: str) -> None:
        try:
            self._examples(job_id, "train.jsonl")
            self._examples(job_id, "valid.jsonl")
        except DataError as err:
            self._end(job_id, "failed", f"invalid file: {err}", "invalid_file")
            return
        self.jobs.write_state(job_id, JobState(status="queued"))
        self.jobs.event(job_id, "Files validated; the job is queued")

    def _start(self, job_id: str) -> None:
        try:
            spec = self.jobs.spec(job_id)
            tokenizer = self.engine.tokenizer
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            trainer = LoRATrainer(self.engine.model, spec, self._examples(job_id, "train.jsonl"),
                                  self._examples(job_id, "valid.jsonl"), self.config.optimizer,
                                  self.config.base_learning_rate, pad or 0)
            checkpoints = self.jobs.checkpoints(job_id)
            if checkpoints:
                trainer.load_checkpoint(checkpoints[0][1])
                self.jobs.event(job_id, f"Resumed from the checkpoint of step {trainer.step}")
        except Exception as err:  # noqa: BLE001 - e.g. targets that match no layer
            logger.exception("fine-tuning job %s could not start", job_id)
            self._end(job_id, "failed", f"{type(err).__name__}: {err}", "invalid_job")
            return
        self.current = (job_id, trainer)
        self.jobs.write_state(job_id, JobState(status="running", step=trainer.step,
                                               trained_tokens=trainer.trained_tokens, total_steps=trainer.total_steps))
        self.jobs.event(job_id, f"Fine-tuning job started ({trainer.total_steps} steps)")
