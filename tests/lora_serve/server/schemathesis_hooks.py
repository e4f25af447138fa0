"""Schemathesis hooks for the fuzz run of ``test_schemathesis.py`` (loaded by the ``st`` CLI through
``SCHEMATHESIS_HOOKS``; not a test module).

- Valid model names too: three of four positive cases that name a ``model`` get one the server serves
  (``LORA_SERVE_FUZZ_MODELS``), chosen from a hash of the case, so the run is deterministic and reaches
  the engine instead of stopping at 404s. Negative cases keep whatever the fuzzer made.
- ``context_length_is_the_only_refusal_of_valid_data``: a schema-valid request may be refused (400) only
  because prompt + max_tokens exceed the model's context, a limit across two fields that JSON Schema
  cannot state; any other 400 to valid data is a contract violation. (The built-in
  ``positive_data_acceptance`` runs too, configured to let such 400s through to this check.)
"""

from __future__ import annotations

import json
import os
import zlib

import schemathesis

MODELS = os.environ["LORA_SERVE_FUZZ_MODELS"].split(",")


@schemathesis.hook
def map_case(context, case):
    """Give most positive cases a model the server serves."""
    body = case.body
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    if positive and isinstance(body, dict) and isinstance(body.get("model"), str):
        pick = zlib.crc32(json.dumps(body, sort_keys=True, default=str).encode())
        if pick % 4:
            body["model"] = MODELS[pick % len(MODELS)]
    return case


@schemathesis.check
def context_length_is_the_only_refusal_of_valid_data(ctx, response, case):
    """A 400 to schema-valid data must carry the code ``context_length_exceeded``."""
    if case.meta is None or not case.meta.generation.mode.is_positive or response.status_code != 400:
        return None
    code = json.loads(response.content)["error"]["code"]
    if code != "context_length_exceeded":
        raise AssertionError(f"schema-valid data refused with a 400: {response.content[:500]!r}")
    return None
