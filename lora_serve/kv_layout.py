"""Where one token's keys and values live in the page pool.

A token needs one key and one value vector of width ``kv_dim = num_kv_heads * head_dim`` per layer,
i.e. ``2 * num_layers`` vectors. With grouped-query attention ``kv_dim`` is usually a fraction of the
slot width ``D`` (SmolLM2: 192 of 576), so ``D // kv_dim`` vectors share one slot instead of wasting two
thirds of it. Vector ``2 * layer + kind`` (kind 0 = key, 1 = value) sits in the token's slot column
``vector // per_slot`` at element offset ``(vector % per_slot) * kv_dim``.

A sequence's page table is an int64 tensor ``[num_tokens, slots_per_token]`` of pool slot indices.
"""

from __future__ import annotations

import math

import torch

KEY, VALUE = 0, 1


class KVLayout:
    """Maps (layer, key/value) of a token to a slot column and an offset inside that slot."""

    def __init__(self, num_layers: int, kv_dim: int, slot_width: int):
        if kv_dim > slot_width:
            raise ValueError(
                f"kv width num_kv_heads*head_dim={kv_dim} exceeds the pool slot width {slot_width}; "
                "models whose key/value projection is wider than the hidden size are not supported"
            )
        self.num_layers = num_layers
        self.kv_dim = kv_dim
        self.per_slot = slot_width // kv_dim
        self.slots_per_token = math.ceil(2 * num_layers / self.per_slot)

    def _where(self, layer: int, kind: int) -> tuple[int, int]:
        vector = 2 * layer + kind
        return vector // self.per_slot, (vector % self.per_slot) * self.kv_dim

    def write(
        self, pool: torch.Tensor, layer: int, key: torch.Tensor, value: torch.Tensor, token_slots: torch.Tensor
    ) -> None:
        """Store ``key`` and ``value`` ``[T, kv_dim]`` of ``layer`` for tokens with page rows ``token_slots [T, S]``."""
        for kind, vectors in ((KEY, key), (VALUE, value)):
            column, offset = self._where(layer, kind)
            # index_copy_ into the column view: one row copy per token, cheaper than advanced-index assignment.
            pool.narrow(1, offset, self.kv_dim).index_copy_(0, token_slots[:, column], vectors.to(pool.dtype))

    def read(self, pool: torch.Tensor, layer: int, token_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather ``layer``'s keys and values for page rows ``token_slots [..., S]``: two ``[..., kv_dim]``.

        Only the columns holding the vectors are gathered (one gather for both when they sit side by side
        in one slot, as they do for an even ``per_slot``): with SmolLM2's 192-wide KV in 576-wide slots
        that is 2/3 of the bytes of whole slots. ``index_select`` rather than advanced indexing: on CPU
        it is several times faster for these row gathers.
        """
        (key_column, key_offset), (value_column, value_offset) = self._where(layer, KEY), self._where(layer, VALUE)

        def gather(column: int, offset: int, width: int) -> torch.Tensor:
            slots = token_slots[..., column]
            return pool.narrow(1, offset, width).index_select(0, slots.reshape(-1)).view(*slots.shape, width)

        if key_column == value_column and value_offset == key_offset + self.kv_dim:
            both = gather(key_column, key_offset, 2 * self.kv_dim)
            return both[..., : self.kv_dim], both[..., self.kv_dim :]
        return gather(key_column, key_offset, self.kv_dim), gather(value_column, value_offset, self.kv_dim)
