"""KV cache with slot-level indirection: a request-to-token table over a pool of KV slots."""

from __future__ import annotations

import torch


class KVPool:
    """K/V for every layer: [num_layers, num_slots, Hkv, D]. Slot 0 is a scratch slot (padding writes land there)."""

    def __init__(self, num_layers, num_slots, num_kv_heads, head_dim, dtype, device):
        shape = (num_layers, num_slots, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots = num_slots

    @staticmethod
    def bytes_per_slot(num_layers, num_kv_heads, head_dim, dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class SlotAllocator:
    """Free list of KV slots (host side; allocation decisions never touch the device)."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free = torch.arange(1, num_slots, dtype=torch.int64)
        self._num_free = num_slots - 1

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def capacity(self) -> int:
        return self.num_slots - 1

    def alloc(self, n: int) -> torch.Tensor | None:
        if n > self._num_free:
            return None
        out = self._free[self._num_free - n : self._num_free].clone()
        self._num_free -= n
        return out

    def free(self, slots: torch.Tensor) -> None:
        n = slots.numel()
        if n == 0:
            return
        if self._num_free + n > self._free.numel():
            raise RuntimeError("KV slots freed twice")
        self._free[self._num_free : self._num_free + n] = slots.to(torch.int64).cpu()
        self._num_free += n


class ReqToTokenPool:
    """[max_reqs, max_context] int32 table: (request row, position) -> KV slot. Row 0 is reserved for padding."""

    def __init__(self, max_reqs: int, max_context: int, device):
        self.table = torch.zeros((max_reqs + 1, max_context), dtype=torch.int32, device=device)
        self._free_rows = list(range(max_reqs, 0, -1))
        self.max_context = max_context

    @property
    def num_free(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> int | None:
        return self._free_rows.pop() if self._free_rows else None

    def free(self, row: int) -> None:
        self._free_rows.append(row)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        self.table[row, start : start + slots.numel()] = slots.to(device=self.table.device, dtype=torch.int32)
