"""pytest plugin of the conformance lane: one JSON record per test (outcome, error, where it starts).

Loaded with `-p tests.conformance.plugin`; writes to the path in `MOEPLUG_CONFORMANCE_OUT` at the end of the
session. A failure's record holds the first line of the exception, the innermost frame of the traceback
(`where`) and the innermost frame inside moeplug/ or kernels/ (`ours`, absent if none), plus the number of
models the seam patched during the test (`patched_models`, patched mode only).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

_REPO = str(Path(__file__).resolve().parents[2]) + "/"
_STDLIB = os.path.dirname(os.__file__) + "/"
# Frames that dynamo / export print inside their messages ("from user code: File ..., line N").
_OUR_FILE = re.compile(r'File "([^"]*/(?:moeplug|kernels)/[^"]*)", line (\d+)')

_results: dict[str, dict] = {}


def _test_name(nodeid: str) -> str:
    return nodeid.split("::")[-1]


def _short_path(path: str) -> str:
    for marker in ("/site-packages/", "/pkg/hf_common_tests/", _REPO):
        if marker in path:
            prefix = "hf_common_tests/" if marker == "/pkg/hf_common_tests/" else ""
            return prefix + path.split(marker, 1)[1]
    return path


def _in_stdlib(path: str) -> bool:
    return path.startswith(_STDLIB) and "site-packages" not in path


def _failure(report) -> dict:
    longrepr = report.longrepr
    crash = getattr(longrepr, "reprcrash", None)
    message = crash.message if crash is not None else str(longrepr)
    lines = [line.strip() for line in message.splitlines() if line.strip()] or [message]
    first = lines[0] + (" " + lines[1] if lines[0].endswith(":") and len(lines) > 1 else "")
    info = {"error": first[:500]}
    chain = getattr(longrepr, "chain", None)
    entries = []
    if chain:
        for traceback_repr, _, _ in chain:
            entries.extend(getattr(traceback_repr, "reprentries", []))
    else:
        entries = getattr(getattr(longrepr, "reprtraceback", None), "reprentries", [])
    locs = [e.reprfileloc for e in entries if getattr(e, "reprfileloc", None) is not None]
    outside_stdlib = [loc for loc in locs if not _in_stdlib(loc.path)]  # e.g. unittest's assertTrue
    if crash is not None and not _in_stdlib(crash.path):
        info["where"] = f"{_short_path(crash.path)}:{crash.lineno}"
    elif outside_stdlib:
        info["where"] = f"{_short_path(outside_stdlib[-1].path)}:{outside_stdlib[-1].lineno}"
    frames = [f"{_short_path(loc.path)}:{loc.lineno}" for loc in locs]
    ours = [f for f in frames if f.startswith(("moeplug/", "kernels/"))]
    ours += [f"{_short_path(path)}:{line}" for path, line in _OUR_FILE.findall(str(longrepr))]
    if ours:
        info["ours"] = ours[-1]
    return info


def pytest_runtest_setup(item):
    from tests.conformance import seam

    seam.PATCHED["count"] = 0


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return (longrepr[2] if isinstance(longrepr, tuple) else str(longrepr))[:300]


def pytest_runtest_logreport(report):
    """Fold a test's phases and unittest subTests into one record.

    failed: any phase or subTest failed. skipped: the test itself skipped, or it had subTests and every one
    of them skipped (e.g. one subTest per model class, none applicable). passed: otherwise.
    """
    record = _results.setdefault(_test_name(report.nodeid), {"outcome": "passed", "seconds": 0.0})
    record["seconds"] = round(record["seconds"] + report.duration, 3)
    is_subtest = getattr(report, "context", None) is not None
    if report.failed:
        if record["outcome"] != "failed":
            record.pop("reason", None)
            record.update(outcome="failed", **_failure(report))
    elif is_subtest:
        record["subtests"] = record.get("subtests", 0) + 1
        if report.skipped:
            record["subtests_skipped"] = record.get("subtests_skipped", 0) + 1
            record.setdefault("subtest_skip_reason", _skip_reason(report))
    elif report.skipped and record["outcome"] == "passed":
        record.update(outcome="skipped", reason=_skip_reason(report))
    if report.when == "call" and not is_subtest:
        from tests.conformance import seam

        record["patched_models"] = seam.PATCHED["count"]
    if report.when == "teardown":
        if record["outcome"] == "passed" and record.get("subtests") and record["subtests"] == record.get("subtests_skipped"):
            record.update(outcome="skipped", reason=record["subtest_skip_reason"])
        record.pop("subtest_skip_reason", None)


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("MOEPLUG_CONFORMANCE_OUT")
    if path:
        with open(path, "w") as f:
            json.dump({"finished": time.time(), "exitstatus": int(exitstatus), "tests": _results}, f, indent=1)
