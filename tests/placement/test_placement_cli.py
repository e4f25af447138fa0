"""Smoke test of `python -m moeplug.placement` (2 gloo processes): it plans, applies and reports."""

from __future__ import annotations

import json

import pytest
import torch

from moeplug.placement import Placement, RoutingTrace
from moeplug.placement.cli import main

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def test_cli_traces_plans_applies_and_reports(tmp_path):
    main(["--ep-size", "2", "--nproc", "2", "--batches", "1", "--batch-size", "2", "--seq", "12",
          "--replicas", "2", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    plan = Placement.load(tmp_path / "placement.json")
    trace = RoutingTrace.load(tmp_path / "trace.safetensors")
    assert plan.num_replicas == 2 and plan.slots.shape == (2, 2, 4)
    assert trace.tokens == 2 * 2 * 12  # both ranks' tokens, summed
    measured = report["measured"]
    # The combine returns every dispatched row: moeplug sends k rows per token whatever the placement.
    total_rows = 2 * 2 * 12 * 2 * 2  # ranks x batch x seq x top_k x layers
    for when in ("before", "after"):
        assert 0 < measured[when]["cross_rank_rows"] <= total_rows
        assert measured[when]["max_mean_load"] >= 1.0
    predicted = report["predicted"]["standard_rows"]["before"]
    assert predicted["traffic_rows"] == pytest.approx(trace.counts.sum().item() / 2)  # (P-1)/P of all rows
    assert torch.equal(plan.slots.unique(), torch.arange(6))
