"""Incremental detokenization with stop strings, for streaming text that never shows a stop string.

The full output is re-decoded each step (outputs are short; this sidesteps tokenizers whose pieces do
not concatenate, such as byte-level BPE splitting a UTF-8 character). Text that could still turn into a
stop string, or that ends in an incomplete character, is held back until it is safe to emit.
"""

from __future__ import annotations

_INCOMPLETE = "\ufffd"  # what decode() yields for a partial UTF-8 sequence


class Detokenizer:
    """Turns a request's growing list of output token ids into text deltas; detects stop strings."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        if stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine was built without one")
        self.tokenizer = tokenizer
        self.stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self._emitted = 0

    def update(self, token_ids: list[int]) -> bool:
        """Re-decode ``token_ids``; return True if a stop string appeared (the text is cut before it)."""
        if self.tokenizer is None:
            return False
        self.text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        # Only text past what was already checked can hold a new stop string.
        start = max(0, self._emitted - self._hold)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def delta(self, finished: bool) -> str:
        """Text not yet emitted that is safe to show now (all of it once the request is finished)."""
        end = len(self.text)
        if not finished:
            end -= self._hold
            while end > self._emitted and self.text[end - 1] == _INCOMPLETE:
                end -= 1
        if end <= self._emitted:
            return ""
        piece, self._emitted = self.text[self._emitted : end], end
        return piece
