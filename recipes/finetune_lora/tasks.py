"""Small fine-tuning tasks made from text every machine has, a character tokenizer, and batching.

The text is English sentences from the docstrings of Python's own standard library (so a fresh machine
needs no download), or the lines of any file given with ``--text`` (e.g. ``../shared/data/abstracts.txt``).
Each task rewrites a sentence in one style; an adapter trained on a task writes in that style, which
is easy to see in its completions and to measure as a lower loss on that task's held-out sentences.
"""

from __future__ import annotations

import ast
import re
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3: pad, bos, eos, unk
_VOWELS = re.compile(r"(?<=\w)[aeiou]")


def _backwards(line: str) -> str:
    # Each word spelled backwards, punctuation kept in place: "Return the list." -> "nruteR eht tsil."
    return re.sub(r"[A-Za-z]+", lambda m: m.group(0)[::-1], line)


# name -> rewrite of one sentence. "plain" is what the base model is pre-trained on.
TASKS: dict[str, Callable[[str], str]] = {
    "plain": lambda line: line,
    "upper": str.upper,
    "novowels": lambda line: _VOWELS.sub("", line),  # vowels dropped except at a word's start
    "backwards": _backwards,
}


def task(name: str) -> Callable[[str], str]:
    """The rewrite function of task ``name``; a clear error for an unknown one."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]


def _clean(sentence: str, min_chars: int, max_chars: int) -> str | None:
    sentence = " ".join(sentence.split())
    ok = (min_chars <= len(sentence) <= max_chars and sentence.isascii() and sentence[0].isupper()
          and sentence.endswith(".") and not re.search(r"[^A-Za-z0-9 ,.;:'()-]", sentence))
    return sentence if ok else None


def _stdlib_docstrings() -> Iterator[str]:
    """Docstrings of the top-level standard-library modules and their classes and functions, sorted by file."""
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc


def load_sentences(text: str | Path | None = None, min_chars: int = 24, max_chars: int = 80) -> list[str]:
    """Distinct prose sentences of ``min_chars``..``max_chars`` ASCII characters, in a fixed order.

    ``text``: a file of lines of prose (each line split into sentences); None takes the standard
    library's docstrings.
    """
    if text is None:
        chunks = (para for doc in _stdlib_docstrings() for para in doc.split("\n\n"))
    else:
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"--text {path}: no such file (expected a text file of prose lines, "
                                    "e.g. ../shared/data/abstracts.txt; leave --text out to use the "
                                    "standard library's docstrings)")
        chunks = path.read_text(encoding="utf-8").splitlines()
    seen, sentences = set(), []
    for chunk in chunks:
        for piece in re.split(r"(?<=\.)\s+", " ".join(chunk.split())):
            sentence = _clean(piece, min_chars, max_chars)
            if sentence and sentence not in seen:
                seen.add(sentence)
                sentences.append(sentence)
    if len(sentences) < 50:
        raise ValueError(f"only {len(sentences)} usable sentences in {text or 'the standard library'}; "
                         f"need at least 50 of {min_chars}-{max_chars} ASCII characters ending in '.'")
    return sentences


def split(sentences: list[str], eval_every: int = 10) -> tuple[list[str], list[str]]:
    """Deterministic train / held-out split: every ``eval_every``-th sentence is held out."""
    held_out = sentences[::eval_every]
    train = [s for i, s in enumerate(sentences) if i % eval_every]
    return train, held_out


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character after the 4 specials (99 ids); other characters are <unk>.

    Saved next to the tiny base model so ``lora-serve --model DIR`` and PEFT read the same ids.
    """
    vocab = {token: i for i, token in enumerate(SPECIALS + [chr(c) for c in range(32, 127)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def encode(tokenizer, lines: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenise ``lines`` (each followed by EOS, so a model learns where a sentence ends) into a padded batch.

    Returns ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding, which the loss skips).
    """
    rows = [tokenizer(line, add_special_tokens=False)["input_ids"][: max_length - 1] + [tokenizer.eos_token_id]
            for line in lines]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def batches(lines: list[str], batch: int, seed: int) -> Iterator[list[str]]:
    """Endless random batches of ``lines`` (seeded: one stream per data-parallel rank)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(lines), generator=generator).tolist()
        for start in range(0, len(order) - batch + 1, batch):
            yield [lines[i] for i in order[start : start + batch]]


def prompt_of(line: str, words: int = 2) -> str:
    """The first ``words`` words of ``line`` and the space after them: what a served model is asked to continue."""
    return " ".join(line.split()[:words]) + " "
