"""Three short-answer tasks built offline and deterministically from research abstracts, and their scoring.

Every example starts from a *passage*: two consecutive sentences of one abstract of
``../shared/data/abstracts.txt`` (at most ``MAX_WORDS`` words, so a training step stays short on a CPU). All
three tasks ask the same prompt (the passage as a chat turn) and differ only in the answer's format, so the
same question sent to each adapter shows which one is which:

- ``first``:   the passage's first sentence, verbatim                  (scored by exact match)
- ``terms``:   its key terms, lower case, comma-separated              (scored by token F1)
- ``summary``: a one-line summary in a fixed template,
               ``A paper about <longest word of sentence 1> and <longest word of sentence 2>.``

The held-out split is by abstract (every ``HELD_OUT_EVERY``-th abstract), so no held-out passage shares
a sentence with a training one.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_TEXT = Path(__file__).resolve().parents[3] / "shared" / "data" / "abstracts.txt"
MAX_WORDS = 36  # words per passage: ~50 tokens, the prompt stays short
MIN_SENTENCE_WORDS = 6
TERM_MIN_LETTERS = 8  # "key term": a word of at least this many letters...
MAX_TERMS = 4
# ...that is not one of these long function words.
_NOT_TERMS = {"although", "however", "therefore", "furthermore", "moreover", "additionally", "particularly",
              "especially", "including", "whereas", "different", "significantly", "respectively", "throughout",
              "recently", "existing", "previous", "previously", "important", "various", "typically", "commonly",
              "usually", "generally", "specifically", "consider", "considered", "provides", "resulting", "introduce",
              "introduces", "demonstrate", "demonstrates", "proposed"}
HELD_OUT_EVERY = 8
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)%][.])\s+(?=[A-Z])")
_WORD = re.compile(r"[A-Za-z][A-Za-z-]*[A-Za-z]")


@dataclass(frozen=True)
class Passage:
    """Two consecutive sentences of one abstract."""

    first: str
    second: str

    @property
    def text(self) -> str:
        return f"{self.first} {self.second}"


def _content_words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text) if w.lower() not in _NOT_TERMS]


def key_terms(text: str) -> list[str]:
    """Distinct words of ``TERM_MIN_LETTERS``+ letters (long function words excepted), in order; ``MAX_TERMS``."""
    seen: list[str] = []
    for word in _content_words(text):
        if len(word.replace("-", "")) >= TERM_MIN_LETTERS and word not in seen:
            seen.append(word)
    return seen[:MAX_TERMS]


def _longest(text: str, exclude: str = "") -> str:
    # The first of the longest content words (ties: the earliest), so the choice is deterministic.
    words = [w for w in _content_words(text) if w != exclude]
    return max(words, key=len) if words else ""


def answer_first(p: Passage) -> str:
    return p.first


def answer_terms(p: Passage) -> str:
    return ", ".join(key_terms(p.text))


def answer_summary(p: Passage) -> str:
    one = _longest(p.first)
    return f"A paper about {one} and {_longest(p.second, exclude=one)}."


TASKS = {"first": answer_first, "terms": answer_terms, "summary": answer_summary}
# How each task's served answers are scored against the reference (both are printed; this one is headlined).
HEADLINE_METRIC = {"first": "exact", "terms": "f1", "summary": "exact"}


def _usable(p: Passage) -> bool:
    words = [len(s.split()) for s in (p.first, p.second)]
    return (min(words) >= MIN_SENTENCE_WORDS and sum(words) <= MAX_WORDS and p.text.isascii()
            and len(key_terms(p.text)) >= 2 and _longest(p.second, exclude=_longest(p.first)) != "")


def load_passages(path: str | Path = DEFAULT_TEXT) -> tuple[list[Passage], list[Passage]]:
    """``(train, held_out)`` passages of the abstracts file (one abstract per line), in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the demo reads research abstracts, one per line; "
                                "pass --text FILE)")
    train, held_out = [], []
    for index, line in enumerate(l for l in path.read_text(encoding="utf-8").splitlines() if l.strip()):
        sentences = _SENTENCE_END.split(" ".join(line.split()))
        passages = [p for p in map(Passage, sentences, sentences[1:]) if _usable(p)]
        (held_out if index % HELD_OUT_EVERY == 0 else train).extend(passages)
    if len(train) < 100 or len(held_out) < 16:
        raise ValueError(f"{path}: only {len(train)} training / {len(held_out)} held-out passages of two sentences "
                         f"within {MAX_WORDS} words; need 100 / 16")
    return train, held_out


def prompt(p: Passage) -> str:
    """The chat prompt every task shares (SmolLM2's template, without its default system turn, to stay short)."""
    return f"<|im_start|>user\n{p.text}<|im_end|>\n<|im_start|>assistant\n"


def example(task: str, p: Passage) -> tuple[str, str]:
    """``(prompt, answer)`` of ``task`` on ``p``; the answer is what the model learns to write."""
    return prompt(p), TASKS[task](p)


def encode(tokenizer, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Left-padded batch of prompt + answer + EOS; labels only on the answer and EOS (-100 elsewhere).

    Left padding puts every answer at the end of its row, so the loss needs logits for the last
    ``keep`` positions only (the LM head over SmolLM2's 49k-token vocabulary is a quarter of a forward pass).
    """
    rows, labels = [], []
    for text, answer in pairs:
        p = tokenizer(text, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(map(len, rows))
    pad = [width - len(r) for r in rows]
    ids = torch.tensor([[tokenizer.pad_token_id] * n + r for n, r in zip(pad, rows)])
    mask = torch.tensor([[0] * n + [1] * len(r) for n, r in zip(pad, rows)])
    keep = max(sum(1 for x in lab if x != -100) for lab in labels) + 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0),
            "labels": torch.tensor([[-100] * n + lab for n, lab in zip(pad, labels)]), "keep": keep}


def batches(items: list, batch: int, seed: int):
    """Endless seeded random batches of ``items``."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(items), generator=generator).tolist()
        for start in range(0, len(order) - batch + 1, batch):
            yield [items[i] for i in order[start : start + batch]]


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the answer equals the reference up to surrounding whitespace."""
    return float(prediction.strip() == reference.strip())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 of lower-cased word tokens (punctuation ignored)."""
    pred, ref = _tokens(prediction), _tokens(reference)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)
