"""Routing traces: which experts each token chose in each MoE layer, in bounded memory.

`record_routing(model)` hooks every experts module of a patched transformers model (or of
`MoELayer`s) and sees the [T, k] expert ids actually dispatched (after capacity dropping, so
dropped slots are left out). Per layer it keeps
  - counts [L, E]: assignments per expert,
  - pairs [L, E, E]: tokens that chose both e and e' in the same layer (diagonal = counts),
  - transitions [L-1, E, E]: (choice in layer l, choice in layer l+1) pairs of the same token
    for consecutive MoE layers, every one of the k x k combinations counted,
and optionally the first `sample_tokens` tokens' raw choices [N, L, k] (-1 for a dropped slot).
Memory is O(L * E^2 + N * L * k) whatever the number of tokens.

Under expert parallelism each rank records its own tokens; `reduce_` sums the counts over ranks.
A module re-run in backward (activation checkpointing) would be counted twice: record under
`torch.no_grad()` or without checkpointing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..state import MoEState, moe_modules


@dataclass
class RoutingTrace:
    """Accumulated routing statistics of one model (see the module docstring)."""

    num_experts: int
    top_k: int
    layer_names: list[str]
    counts: torch.Tensor  # [L, E] float64
    pairs: torch.Tensor  # [L, E, E] float64
    transitions: torch.Tensor  # [L-1, E, E] float64
    tokens: int = 0  # tokens seen per layer
    sample: torch.Tensor | None = None  # [N, L, k] long, -1 = dropped
    _sampled: int = field(default=0, repr=False)

    @classmethod
    def empty(cls, num_layers: int, num_experts: int, top_k: int, layer_names=None, sample_tokens: int = 0) -> RoutingTrace:
        """A trace with nothing recorded yet."""
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        sample = torch.full((sample_tokens, num_layers, top_k), -1, dtype=torch.long) if sample_tokens else None
        return cls(num_experts, top_k, list(layer_names or [f"layer{i}" for i in range(num_layers)]),
                   zeros(num_layers, num_experts), zeros(num_layers, num_experts, num_experts),
                   zeros(max(num_layers - 1, 0), num_experts, num_experts), 0, sample)

    @property
    def num_layers(self) -> int:
        return self.counts.shape[0]

    def sample_rows(self) -> torch.Tensor | None:
        """The recorded part of the raw sample, [n, L, k], or None."""
        return None if self.sample is None else self.sample[: self._sampled]

    def _multi_hot(self, index: torch.Tensor) -> torch.Tensor:
        kept = index < self.num_experts
        hot = torch.zeros(index.shape[0], self.num_experts + 1, dtype=torch.float64)
        hot.scatter_(1, torch.where(kept, index, self.num_experts), 1.0)
        return hot[:, : self.num_experts]

    def add(self, layer: int, index: torch.Tensor, previous: torch.Tensor | None) -> None:
        """Record layer `layer`'s [T, k] choices; `previous`: layer-1's choices of the same tokens."""
        index = index.detach().reshape(-1, index.shape[-1]).cpu().long()
        if index.shape[1] != self.top_k:
            raise ValueError(f"layer {self.layer_names[layer]} routed with top_k={index.shape[1]}, "
                             f"the trace expects {self.top_k}")
        hot = self._multi_hot(index)
        self.counts[layer] += hot.sum(0)
        self.pairs[layer] += hot.T @ hot
        if layer == 0:
            self.tokens += index.shape[0]
        elif previous is not None and previous.shape[0] == index.shape[0]:
            self.transitions[layer - 1] += self._multi_hot(previous).T @ hot
        if self.sample is not None:
            start = self._sampled
            rows = min(index.shape[0], self.sample.shape[0] - start)
            self.sample[start: start + rows, layer] = torch.where(index[:rows] < self.num_experts, index[:rows], -1)
            if layer == self.num_layers - 1:
                self._sampled += rows

    def reduce_(self, group=None) -> RoutingTrace:
        """Sum counts, pairs, transitions and tokens over the ranks of `group` (collective)."""
        for tensor in (self.counts, self.pairs, self.transitions):
            dist.all_reduce(tensor, group=group)
        tokens = torch.tensor([float(self.tokens)], dtype=torch.float64)
        dist.all_reduce(tokens, group=group)
        self.tokens = int(tokens.item())
        return self

    def save(self, path: str | Path) -> None:
        """Write the trace as one safetensors file (metadata in its header)."""
        tensors = {"counts": self.counts, "pairs": self.pairs, "transitions": self.transitions}
        if self.sample is not None:
            tensors["sample"] = self.sample_rows().contiguous()
        meta = {"num_experts": self.num_experts, "top_k": self.top_k, "layer_names": self.layer_names,
                "tokens": self.tokens}
        save_file(tensors, str(path), metadata={"moeplug_trace": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        """Read a trace written by `save`."""
        with safe_open(str(path), framework="pt") as file:
            meta = json.loads(file.metadata()["moeplug_trace"])
            tensors = {key: file.get_tensor(key) for key in file.keys()}
        sample = tensors.get("sample")
        return cls(meta["num_experts"], meta["top_k"], meta["layer_names"], tensors["counts"], tensors["pairs"],
                   tensors["transitions"], meta["tokens"], sample, 0 if sample is None else sample.shape[0])


def moe_layers(model: nn.Module) -> dict[str, MoEState]:
    """The MoE layers of a patched transformers model or of `MoELayer`s by experts module name, in model order."""
    found = {layer.experts_name: layer.state for layer in moe_modules(model)}
    if not found:
        raise ValueError(f"{type(model).__name__} has no MoE experts modules (patch it with moeplug.patch_model "
                         "or build it from moeplug.MoELayer)")
    return found


@contextmanager
def record_routing(model: nn.Module, sample_tokens: int = 0) -> Iterator[RoutingTrace]:
    """Record the routing of every forward pass in the block into the yielded `RoutingTrace`.

    Args:
        model: a model patched by `moeplug.patch_model` (any ep_size) or built from `MoELayer`s.
        sample_tokens: keep the raw choices of the first this many tokens (0: counts only).
    """
    layers = moe_layers(model)
    first = next(iter(layers.values())).config
    trace = RoutingTrace.empty(len(layers), first.num_experts, first.top_k, list(layers), sample_tokens)
    positions = {layer.experts: i for i, layer in enumerate(layers.values())}
    previous: list[torch.Tensor | None] = [None]  # the last layer's choices, for transitions

    def hook(module, args, kwargs):
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        layer = positions[module]
        trace.add(layer, index, previous[0] if layer > 0 else None)
        previous[0] = index.detach().reshape(-1, index.shape[-1]).cpu().long()

    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module in positions]
    try:
        yield trace
    finally:
        for handle in handles:
            handle.remove()
