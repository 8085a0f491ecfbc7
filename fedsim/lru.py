"""A cache of tensor dicts bounded in bytes, least recently used first out (client states, encoded samples)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

import torch

from fedsim.messages import nbytes


class BytesLRU(OrderedDict):
    """Dicts of tensors by key, least recently used first, dropped from the front beyond ``budget`` bytes in
    all (0: nothing kept; a value larger than the budget is never kept)."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget, self.bytes = budget, 0

    def lookup(self, key: Hashable) -> dict[str, torch.Tensor] | None:
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def keep(self, key: Hashable, value: dict[str, torch.Tensor]) -> None:
        old = self.pop(key, None)
        if old is not None:
            self.bytes -= nbytes(old)
        size = nbytes(value)
        if size > self.budget:
            return
        self[key] = value
        self.bytes += size
        while self.bytes > self.budget:
            _, dropped = self.popitem(last=False)
            self.bytes -= nbytes(dropped)
