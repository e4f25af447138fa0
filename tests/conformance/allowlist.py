"""Tests that cannot apply to a patched model, each with the reason. Keep it small and explicit.

An entry here never hides a failure: the report still lists the test (with its error and this reason) under
"not applicable", separately from the regressions. Add an entry only when the test checks something the patch
changes by design, never because the patched model is wrong. Keys are test names (the part after `::`) or
prefixes of parameterized names ending in `*`; values are the reason.
"""

from __future__ import annotations

NOT_APPLICABLE: dict[str, str] = {}


def reason(test: str) -> str | None:
    """The documented reason why `test` does not apply to a patched model, or None."""
    if test in NOT_APPLICABLE:
        return NOT_APPLICABLE[test]
    for key, why in NOT_APPLICABLE.items():
        if key.endswith("*") and test.startswith(key[:-1]):
            return why
    return None
