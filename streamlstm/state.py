"""The per-key state table: h and c of every layer for every live key, on the model's device.

Keys map to rows of two preallocated tensors, so a step gathers and scatters whole batches at once.
The table knows nothing of Kafka or of the step math.
"""

from __future__ import annotations

import torch


class StateTable:
    def __init__(
        self, num_layers: int, hidden_size: int, device: torch.device, capacity: int = 1024
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.device = device
        self._rows: dict[str, int] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self.h = torch.zeros(num_layers, capacity, hidden_size, device=device)
        self.c = torch.zeros_like(self.h)
        self.steps = torch.zeros(capacity, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self, keys: list[str]) -> torch.Tensor:
        """Row index of each key, giving a key seen for the first time a zeroed row."""
        rows = self._rows
        out = []
        for key in keys:
            row = rows.get(key)
            out.append(self._admit(key) if row is None else row)
        return torch.tensor(out, dtype=torch.int64)

    def _admit(self, key: str) -> int:
        if not self._free:
            self._grow()
        row = self._free.pop()
        self.h[:, row].zero_()
        self.c[:, row].zero_()
        self.steps[row] = 0
        self._rows[key] = row
        return row

    def _grow(self) -> None:
        """Double the capacity; amortised, so admitting keys stays O(1)."""
        old = self.h.shape[1]
        self.h = torch.cat([self.h, torch.zeros_like(self.h)], dim=1)
        self.c = torch.cat([self.c, torch.zeros_like(self.c)], dim=1)
        self.steps = torch.cat([self.steps, torch.zeros_like(self.steps)])
        self._free.extend(range(2 * old - 1, old - 1, -1))

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = rows.to(self.device, non_blocking=True)
        return self.h.index_select(1, idx), self.c.index_select(1, idx)

    def scatter(self, rows: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Store a step's result and return each row's step count after it.

        Rows must be distinct: index_copy_ with duplicate indices is undefined.
        """
        idx = rows.to(self.device, non_blocking=True)
        self.h.index_copy_(1, idx, h)
        self.c.index_copy_(1, idx, c)
        self.steps[rows] += 1
        return self.steps[rows]

    def drop(self, keys: list[str]) -> None:
        for key in keys:
            row = self._rows.pop(key, None)
            if row is not None:
                self._free.append(row)
