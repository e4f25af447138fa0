"""Training files: JSONL validation (at upload) and tokenization with loss masks (when a job starts).

Two line formats, as OpenAI's fine-tuning accepts them:

* chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`` with at least one
  assistant message; the loss covers the assistant turns only (TRL's ``assistant_only_loss``);
* prompt/completion: ``{"prompt": "...", "completion": "..."}``; the loss covers the completion and the
  EOS token after it (TRL's ``completion_only_loss``).

Chat masking renders the tokenizer's chat template on growing prefixes of the conversation: the tokens an
assistant message adds after ``apply_chat_template(messages[:i], add_generation_prompt=True)`` up to
``apply_chat_template(messages[:i + 1])`` are that turn's content and end-of-turn markers, which the loss
covers; the role header and every other turn get label -100. This needs a template whose renderings of a
prefix are a prefix of the whole (ChatML and Llama templates are); otherwise the example is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

IGNORE = -100
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A training file or example that cannot be used; the message names the line and the problem."""


@dataclass(frozen=True)
class Example:
    """One tokenized example: ``input_ids`` and ``labels`` (-100 where the loss is masked), equally long."""

    input_ids: list[int]
    labels: list[int]


def _check_line(number: int, record) -> None:
    where = f"line {number}"
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                role = message.get("role") if isinstance(message, dict) else message
                raise DataError(f"{where}: messages[{i}].role is {role!r}, expected one of {list(ROLES)}")
            if not isinstance(message.get("content"), str):
                raise DataError(f"{where}: messages[{i}].content must be a string")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant message, so nothing to train on")
    elif "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                raise DataError(f"{where}: {key!r} must be a string in a prompt/completion example")
        if not record["completion"]:
            raise DataError(f"{where}: 'completion' is empty, so nothing to train on")
    else:
        raise DataError(f"{where}: expected a chat example {{\"messages\": [...]}} or {{\"prompt\", \"completion\"}}")


def parse_jsonl(data: bytes) -> list[dict]:
    """The examples of a JSONL training file; ``DataError`` naming the first bad line (1-based)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"the file is not UTF-8 text (byte {err.start})") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"line {number}: not valid JSON ({err.msg} at column {err.colno})") from None
        _check_line(number, record)
        records.append(record)
    if not records:
        raise DataError("the file holds no examples")
    return records


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def _chat_example(tokenizer, messages: list[dict]) -> Example:
    ids: list[int] = []
    labels: list[int] = []
    for i, message in enumerate(messages):
        before = _render(tokenizer, messages[:i], message["role"] == "assistant")
        after = _render(tokenizer, messages[: i + 1], False)
        if after[: len(ids)] != ids or before[: len(ids)] != ids or after[: len(before)] != before:
            raise DataError("the tokenizer's chat template does not render a conversation's prefixes as prefixes "
                            "of it, so assistant turns cannot be masked")
        masked = before if message["role"] == "assistant" else after
        labels += [IGNORE] * (len(masked) - len(ids))
        if message["role"] == "assistant":
            labels += after[len(before):]
        ids = after
    return Example(ids, labels)


def tokenize(tokenizer, record: dict) -> Example:
    """``record`` (a line ``parse_jsonl`` accepted) as token ids and loss labels; see the module docstring."""
    if "messages" in record:
        if tokenizer.chat_template is None:
            raise DataError("chat examples need a tokenizer with a chat template")
        return _chat_example(tokenizer, record["messages"])
    prompt = tokenizer(record["prompt"])["input_ids"] if record["prompt"] else []
    completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion = completion + [tokenizer.eos_token_id]
    return Example(prompt + completion, [IGNORE] * len(prompt) + completion)
