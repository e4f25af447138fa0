"""Expert parallelism across simulated hosts (tests/multihost/harness.py: namespaces, veth links, torchrun).

Flat and hierarchical dispatch on 2 hosts x 2 ranks both equal one process (outputs and every gradient),
and the hierarchical exchange sends fewer bytes over the hosts' links.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.test_expert_parallel_gloo import _layer, check_against_ep1
from tests.multihost.harness import cluster, unavailable_reason

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(400),
              pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))]


def test_hierarchical_and_flat_dispatch_across_hosts_equal_one_process(tmp_path):
    hosts, procs = 2, 2
    with cluster(hosts) as net:
        runs = net.torchrun(procs, ["tests/multihost/ep_worker.py", str(tmp_path)], timeout=300)
    for host, (code, output) in enumerate(runs):
        assert code == 0, f"host {host} exited {code}:\n{output[-3000:]}"
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(hosts * procs)]
    sent = {}
    for mode in ("flat", "hierarchical"):
        per_rank = [result[mode] for result in results]
        assert [r["hierarchical"] for r in per_rank] == [mode == "hierarchical"] * len(per_rank)
        check_against_ep1(per_rank, _layer(1), ep_size=hosts * procs)
        sent[mode] = sum(r["link_tx"] for r in per_rank)
    # Top-2 of 8 experts on 2 hosts: a token whose two remote experts sit on the two ranks of one host
    # crosses once instead of twice (about 1 token in 7 here), and the combine returns the same rows.
    assert 0 < sent["hierarchical"] < sent["flat"], sent
