"""``benchmarks/serve_http.py --smoke`` runs end to end (server subprocess, open-loop client, in-process
baseline) and writes every field for both systems; so does ``benchmarks/serve_http_closed.py --smoke``
(closed batches: the server with its engine process, with every core for it and with ``--engine-thread``,
streamed and not, vs the engine in-process and PEFT). A benchmark is not a test: no timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
FIELDS = ("requests", "errors", "output_tokens", "seconds", "tokens_per_s", "requests_per_s",
          "ttft_p50", "ttft_p90", "ttft_p99", "itl_p50", "itl_p90", "itl_p99", "slo_attainment")

pytestmark = pytest.mark.slow  # imports torch twice and starts a uvicorn subprocess


def test_smoke_run_reports_every_field_for_http_and_in_process(tmp_path):
    out = tmp_path / "serve_http.json"
    done = subprocess.run([sys.executable, "benchmarks/serve_http.py", "--smoke", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)  # a hang guard, not a timing
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    report = json.loads(out.read_text())
    assert report["systems"] == ["http", "in-process"]
    assert len(report["results"]) == len(report["args"]["rates"]) >= 2
    for row in report["results"]:
        assert set(row["systems"]) == {"http", "in-process"}
        for system, stats in row["systems"].items():
            missing = [f for f in FIELDS if f not in stats]
            assert not missing, f"rate {row['rate']} {system}: missing {missing}"
            # Every request finished and streamed tokens, so the percentiles are numbers, not NaN.
            assert stats["errors"] == 0, stats["first_errors"]
            assert stats["output_tokens"] > 0 and stats["ttft_p50"] == stats["ttft_p50"]
    assert "| http / in-process |" in report["table"]


def test_closed_batch_smoke_run_reports_every_system_and_ratio(tmp_path):
    out = tmp_path / "serve_http_closed.json"
    done = subprocess.run([sys.executable, "benchmarks/serve_http_closed.py", "--smoke", "--threads", "1",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    report = json.loads(out.read_text())
    systems = {"http", "http-sse", "http-all-cores", "http-all-cores-sse", "http-thread", "http-thread-sse",
               "in-process", "peft-mixed"}
    assert [row["concurrency"] for row in report["results"]] == report["args"]["concurrency"]
    for row in report["results"]:
        assert set(row["tokens_per_s"]) == systems
        # Every run made exactly C*G tokens (the script exits otherwise), so each rate is a positive number.
        assert all(rate > 0 for rate in row["tokens_per_s"].values())
        assert set(row["ratios"]) == {f"{s}/{base}" for s in systems if s.startswith("http")
                                      for base in ("in-process", "peft-mixed")}
    assert " http/in-process " in report["table"]
