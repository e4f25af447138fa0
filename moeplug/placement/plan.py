"""A placement plan: for every MoE layer, which expert each slot of each expert-parallel rank holds.

`slots[l][r][s]` is the global expert id in slot s of rank r for MoE layer l. Every expert appears
at least once per layer; an expert in several slots is replicated, and its tokens are split evenly
over its copies (see `moeplug.dispatch.ExpertParallel.slot_of`). All ranks hold the same number
of slots S, so the expert weights stay one [S, ...] tensor per rank.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

PLAN_FILE = "placement.json"


def rank_share(slots: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[..., E, P] share of expert e's tokens served by rank r for slot tables [..., P, S]."""
    one_hot = torch.nn.functional.one_hot(slots, num_experts).double()  # [..., P, S, E]
    per_rank = one_hot.sum(-2).transpose(-1, -2)  # [..., E, P] copies of e on r
    return per_rank / per_rank.sum(-1, keepdim=True)


@dataclass
class Placement:
    """Expert -> rank slots for each MoE layer (see the module docstring)."""

    slots: torch.Tensor  # [L, P, S] long
    num_experts: int
    layer_names: list[str] = field(default_factory=list)  # experts modules, in model order (optional)
    info: dict = field(default_factory=dict)  # how it was made (planner, objective, gap, ...)

    def __post_init__(self) -> None:
        self.slots = torch.as_tensor(self.slots, dtype=torch.long)
        if self.slots.dim() != 3:
            raise ValueError(f"slots has shape {tuple(self.slots.shape)}, expected [layers, ranks, slots per rank]")
        for layer, table in enumerate(self.slots):
            held = torch.bincount(table.reshape(-1), minlength=self.num_experts)
            if table.min() < 0 or len(held) > self.num_experts or bool((held == 0).any()):
                raise ValueError(f"layer {layer}: slots must hold each of experts 0..{self.num_experts - 1} at "
                                 f"least once and nothing else; got {table.tolist()}")
        if self.layer_names and len(self.layer_names) != self.num_layers:
            raise ValueError(f"{len(self.layer_names)} layer names for {self.num_layers} layers")

    @property
    def num_layers(self) -> int:
        return self.slots.shape[0]

    @property
    def ep_size(self) -> int:
        return self.slots.shape[1]

    @property
    def slots_per_rank(self) -> int:
        return self.slots.shape[2]

    @property
    def num_replicas(self) -> int:
        """Extra copies per layer beyond one per expert."""
        return self.ep_size * self.slots_per_rank - self.num_experts

    def rank_share(self) -> torch.Tensor:
        """[L, E, P] share of expert e's tokens served by rank r (copies split tokens evenly)."""
        return rank_share(self.slots, self.num_experts)

    @classmethod
    def contiguous(cls, num_layers: int, num_experts: int, ep_size: int, layer_names: list[str] | None = None) -> Placement:
        """moeplug's default layout: rank r holds experts [r*E/P, (r+1)*E/P) in every layer."""
        if num_experts % ep_size:
            raise ValueError(f"ep_size={ep_size} must divide num_experts={num_experts}")
        table = torch.arange(num_experts).view(ep_size, num_experts // ep_size)
        return cls(table.expand(num_layers, -1, -1).clone(), num_experts, list(layer_names or []),
                   {"planner": "contiguous"})

    def to_json(self) -> dict:
        """A JSON-serialisable dict (`from_json` reverses it)."""
        return {"num_experts": self.num_experts, "slots": self.slots.tolist(),
                "layer_names": self.layer_names, "info": self.info}

    @classmethod
    def from_json(cls, data: dict) -> Placement:
        """Inverse of `to_json`."""
        return cls(torch.tensor(data["slots"]), int(data["num_experts"]), list(data.get("layer_names", [])),
                   dict(data.get("info", {})))

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON (a directory gets `placement.json` inside)."""
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILE
        path.write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> Placement:
        """Read a plan written by `save` (a file, or a directory holding `placement.json`)."""
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILE
        return cls.from_json(json.loads(path.read_text()))
