"""Tests of the conformance lane itself (fast, offline), plus an opt-in run of one family.

The lane (`make conformance`, ~20 min) is not part of the default run. `MOEPLUG_CONFORMANCE=1` (network once,
or the sdist already cached) enables `test_one_family_has_no_regressions`, a focused subset of one family in
both modes (~2 min).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conformance import allowlist, sdist
from tests.conformance.report import compare, dumps, markdown, slim

REPO = Path(__file__).resolve().parents[2]


def test_compare_separates_regressions_allowlisted_and_fixed(monkeypatch):
    monkeypatch.setitem(allowlist.NOT_APPLICABLE, "test_param_*", "checks a parameter the patch replaces")
    eager = {"test_a": {"outcome": "passed"}, "test_b": {"outcome": "passed"}, "test_c": {"outcome": "failed"},
             "test_param_1_fp16": {"outcome": "passed"}, "test_d": {"outcome": "skipped"},
             "test_e": {"outcome": "failed", "error": "E"}}
    patched = {"test_a": {"outcome": "failed", "error": "ValueError: x", "where": "f.py:1", "ours": "moeplug/x.py:2",
                          "patched_models": 1},
               "test_b": {"outcome": "passed", "patched_models": 0}, "test_c": {"outcome": "failed"},
               "test_param_1_fp16": {"outcome": "failed", "error": "AssertionError"},
               "test_d": {"outcome": "failed"}, "test_e": {"outcome": "passed", "patched_models": 2}}
    result = compare(eager, patched)
    assert result["regressions"] == [{"test": "test_a", "error": "ValueError: x", "where": "f.py:1",
                                      "ours": "moeplug/x.py:2"}]
    assert [r["test"] for r in result["not_applicable"]] == ["test_param_1_fp16"]
    assert result["not_applicable"][0]["reason"] == "checks a parameter the patch replaces"
    assert result["fixed_by_patch"] == [{"test": "test_e", "unpatched_error": "E"}]
    assert result["passed_patched_without_building_a_model"] == ["test_b"]


def test_markdown_lists_each_regression_with_its_error():
    report = {"command": "python -m tests.conformance", "transformers": "5", "torch": "2", "date": "d",
              "wall_seconds": 1.0, "machine": "m", "families": {"mixtral": {
                  "eager": {"counts": {"passed": 2, "failed": 0, "skipped": 1}},
                  "patched": {"counts": {"passed": 1, "failed": 1, "skipped": 1}},
                  "regressions": [{"test": "test_a", "error": "ValueError: a | b", "where": "w.py:3"}],
                  "not_applicable": []}}}
    text = markdown(report)
    assert "| mixtral | 2 / 0 / 1 | 1 / 1 / 1 | 1 | 0 |" in text
    assert "| mixtral | `test_a` | ValueError: a \\| b | `w.py:3` | `–` |" in text


def test_report_json_is_one_line_per_test_and_round_trips():
    tests = {"test_a": {"outcome": "passed", "seconds": 0.5, "patched_models": 0},
             "test_b": {"outcome": "failed", "seconds": 3.0, "error": "E: {x}", "patched_models": 1}}
    report = {"families": {"mixtral": {"eager": {"tests": slim(tests, "eager")},
                                       "patched": {"tests": slim(tests, "patched")}}}}
    assert report["families"]["mixtral"]["eager"]["tests"]["test_a"] == {"outcome": "passed"}
    text = dumps(report)
    assert json.loads(text) == report
    assert '"test_b": {"outcome": "failed", "seconds": 3.0, "error": "E: {x}", "patched_models": 1}' in text


def test_offline_without_cache_fails_with_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setattr(sdist, "CACHE", tmp_path)

    def no_network(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies ...")

    monkeypatch.setattr(sdist.subprocess, "run", no_network)
    with pytest.raises(sdist.SdistUnavailable, match="needs the network once") as excinfo:
        sdist.ensure()
    assert "pip download --no-binary :all: --no-deps transformers==" in str(excinfo.value)
    assert "Could not find a version" in str(excinfo.value)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MOEPLUG_CONFORMANCE") != "1", reason="opt-in: MOEPLUG_CONFORMANCE=1")
def test_one_family_has_no_regressions(tmp_path):
    family = os.environ.get("MOEPLUG_CONFORMANCE_FAMILY", "mixtral")
    keyword = ("sdpa_inference_0 or sdpa_inference_2 or bf16 or fp16 or init_weights or save_load or "
               "meta or training or test_moeplug_")
    out = tmp_path / "conformance.json"
    done = subprocess.run([sys.executable, "-m", "tests.conformance", "--families", family, "-k", keyword,
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.exists(), done.stdout + done.stderr
    fam = json.loads(out.read_text())["families"][family]
    assert fam["eager"]["counts"]["passed"] > 10, fam["eager"]["counts"]  # the subset really ran
    assert fam["regressions"] == [], out.with_suffix(".md").read_text()
