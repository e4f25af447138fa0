"""Where the node layout comes from (torchrun's environment) and the checks on it; no processes needed."""

from __future__ import annotations

import pytest

from moeplug.ep_layout import ExpertParallel, node_layout

TORCHRUN = dict(WORLD_SIZE="8", LOCAL_WORLD_SIZE="2", GROUP_RANK="2", LOCAL_RANK="1", RANK="5")
DEEPSPEED = dict(WORLD_SIZE="8", LOCAL_SIZE="4", CROSS_RANK="1", LOCAL_RANK="2", RANK="6")


@pytest.mark.parametrize("env,expected", [
    (TORCHRUN, 2),  # rank 5 = node 2 x 2 + local rank 1: torchrun's numbering
    ({**TORCHRUN, "RANK": "3"}, None),  # numbered otherwise: no layout assumed
    ({**TORCHRUN, "WORLD_SIZE": "2"}, None),  # one host
    ({}, None),  # not under torchrun
    ({**TORCHRUN, "MOEPLUG_RANKS_PER_NODE": "4"}, 4),  # the override wins
    (DEEPSPEED, 4),  # DeepSpeed's launcher: LOCAL_SIZE, CROSS_RANK
])
def test_node_layout_from_torchrun_environment(monkeypatch, env, expected):
    for key in (*TORCHRUN, *DEEPSPEED, "MOEPLUG_RANKS_PER_NODE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert node_layout() == expected


def test_bad_node_layouts_are_clear_errors(monkeypatch):
    monkeypatch.setenv("MOEPLUG_RANKS_PER_NODE", "two")
    with pytest.raises(ValueError, match="MOEPLUG_RANKS_PER_NODE='two' must be a positive integer"):
        node_layout()
    with pytest.raises(ValueError, match="ranks_per_node=3 must be a positive integer dividing ep_size=4"):
        ExpertParallel(4, 0, 8, ranks_per_node=3)
    with pytest.raises(ValueError, match="hierarchical dispatch needs an EP group spanning hosts"):
        ExpertParallel(4, 0, 8, ranks_per_node=4, hierarchical=True)


@pytest.mark.parametrize("ranks_per_node,hierarchical", [(None, False), (1, False), (2, True), (4, False), (8, False)])
def test_hierarchical_by_default_only_across_hosts_with_several_ranks_each(ranks_per_node, hierarchical):
    layout = ExpertParallel(4, 1, 8, ranks_per_node=ranks_per_node)
    assert layout.hierarchical is hierarchical
    assert layout.with_slots([[0, 1], [2, 3], [4, 5], [6, 7]]).hierarchical is hierarchical  # kept by placement
