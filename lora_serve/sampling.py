"""Sampling parameters of a request and the per-step sampler (greedy, temperature, top-k, top-p, seed)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_TEMPERATURE = 1e-5
_SEED_MODULUS = 2**64  # torch generators take 64-bit seeds


@dataclass(frozen=True)
class SamplingParams:
    """How to pick a request's tokens and when to stop (OpenAI / vLLM meanings).

    ``temperature`` below ``MIN_TEMPERATURE`` (1e-5, as in vLLM) is greedy: dividing logits by a smaller
    number only sharpens the distribution onto the argmax while risking overflow. ``top_k=0`` and
    ``top_p=1`` disable those filters; top-p always keeps the most likely token. ``seed`` (any integer;
    seeds equal modulo 2**64 are the same seed) makes a sampled request reproducible whatever else shares
    its batch. Generation stops after ``max_tokens``
    tokens, at a token in ``stop_token_ids`` or the model's end-of-sequence ids (unless ``ignore_eos``),
    or when the text contains one of ``stop`` (the text is cut before it).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):  # accept a single string like the OpenAI API does
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer or None, got {type(self.seed).__name__}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = disabled), got {self.top_k!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must hold non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative integers")

    @property
    def greedy(self) -> bool:
        """Whether tokens are chosen by argmax (``temperature < MIN_TEMPERATURE``)."""
        return self.temperature < MIN_TEMPERATURE


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The random generator a sampled request draws from (seeded if ``params.seed``); None when greedy."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed % _SEED_MODULUS)
    return generator


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) to -inf; ``logits`` is one row ``[V]``."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p. The first is always kept
        # explicitly: a top_p below float32's smallest number (1e-300) rounds to 0 in the comparison.
        drop = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int | Exception]:
    """Pick one token per row of ``logits [B, V]`` using each row's parameters and generator.

    A row whose sampling fails (e.g. the model produced NaN logits for it) gets the exception in place
    of a token, so one request's failure never costs the others theirs.
    """
    logits = logits.float()
    tokens: list[int | Exception] = logits.argmax(-1).tolist()
    for row, (p, generator) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        try:
            # Subtracting the row's maximum first keeps every finite logit <= 0 after the division, so no
            # temperature the API accepts can overflow it; the top token always keeps probability > 0.
            scaled = (logits[row] - logits[row].max()) / p.temperature
            filtered = _filter(scaled, p.top_k, p.top_p)
            tokens[row] = int(torch.multinomial(filtered.softmax(-1), 1, generator=generator))
        except Exception as err:  # e.g. torch's RuntimeError for NaN probabilities
            tokens[row] = err
    return tokens
