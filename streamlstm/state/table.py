"""The per-key state table: h and c of every layer for every live key, on the model's device.

Keys map to rows of preallocated tensors, so a step gathers and scatters whole batches at once. Each
key belongs to a shard (the daemon uses the input partition), so a shard's keys can be dropped or
restored together. Besides h and c, a row remembers its step count, the position of the last event
applied (`offset`) and that event's time (`time`, for expiry). The table records which keys changed and
which were dropped since the last `take_changes`, which is what a checkpoint writes out.
The table knows nothing of Kafka or of the step math.

h and c hold one row past the capacity, the scratch row, that is never given to a key: a step of a
fixed size (the CUDA graphs of graphed_step.py) points its padding slots there. `h` and `c` are views
without it; the table's own index operations run on the whole buffers, because index_select on such a
view takes a slow path on the CPU (50-200x slower at 1 024-8 192 rows). The buffers are reallocated only
when the table grows or restarts with another shape, and `storage_generation` counts the allocations, so
whatever holds their addresses (a captured graph) knows when to take them anew.

h and c are kept in the table's element type (state.dtype, dtypes.py): `gather` widens rows to float32
for the step and `scatter` rounds the step's result back; `export` and `load` move them as stored.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch

from .dtypes import ELEMENTS, Element

StateKey = tuple[int, str]  # (shard, key)


@dataclass
class Rows:
    """Rows' state copied to the host: h and c are [layers, n, hidden], in an element type's storage."""

    keys: list[StateKey]
    h: np.ndarray
    c: np.ndarray
    steps: np.ndarray
    offsets: np.ndarray
    times: np.ndarray


@dataclass
class Changes:
    """Since the last checkpoint: dropped keys with the offset that dropped them, then changed keys (and,
    with a bound on resident keys, changed keys evicted since, as changelog values: `encoded`)."""

    dropped: list[tuple[StateKey, int]]
    changed: Rows
    encoded: list[tuple[StateKey, bytes]] = field(default_factory=list)


@dataclass
class Evicted:
    """Rows taken out of the table, with whether each was changed since the last take and which take
    last took it (`seqs`: see StateTable.take_changes)."""

    rows: Rows
    dirty: np.ndarray
    seqs: np.ndarray


class StateTable:
    def __init__(self, num_layers: int, hidden_size: int, device: torch.device, capacity: int = 1024,
                 dtype: str = "float32") -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.device = device
        self.element: Element = ELEMENTS[dtype]
        self.dtype: torch.dtype = getattr(torch, dtype)
        self.storage: torch.dtype = getattr(torch, self.element.storage.name)  # the host's view: NumPy's
        self._rows: dict[StateKey, int] = {}
        self._keys: list[StateKey | None] = [None] * capacity
        self._free = list(range(capacity - 1, -1, -1))
        self._dirty: set[int] = set()
        self._dropped: dict[StateKey, int] = {}  # since the last take, each key's last drop
        self._tick = 0
        self.max_rows = 0  # the most rows growing goes to when they suffice (a bound on resident keys); 0: none
        self.storage_generation = 0
        self._allocate(num_layers, hidden_size)
        self.steps = torch.zeros(capacity, dtype=torch.int64)
        self.offsets = np.full(capacity, -1, dtype=np.int64)
        self.times = np.zeros(capacity, dtype=np.int64)
        self.shards = np.full(capacity, -1, dtype=np.int64)
        self.used = np.zeros(capacity, dtype=np.int64)  # when each row was last asked for: the LRU order
        self.taken = np.zeros(capacity, dtype=np.int64)  # the take that last took each row's change
        self.pending: np.ndarray | None = None  # see keep_pending
        self.since: np.ndarray | None = None
        self.outputs: np.ndarray | None = None  # see keep_outputs

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def h(self) -> torch.Tensor:
        """Every row's h, [layers, capacity, hidden]: a view to read or write in place, not to keep."""
        return self._h[:, :self.scratch_row]

    @property
    def c(self) -> torch.Tensor:
        """Every row's c, as `h`."""
        return self._c[:, :self.scratch_row]

    @property
    def scratch_row(self) -> int:
        """The row past the capacity that no key is ever given: padding may read and write it."""
        return len(self._keys)

    def padded_storage(self) -> tuple[torch.Tensor, torch.Tensor]:
        """h and c with the scratch row, [layers, capacity + 1, hidden]; valid until storage_generation changes."""
        return self._h, self._c

    def _allocate(self, num_layers: int, hidden_size: int, kept: int = 0) -> None:
        """New zeroed h and c for the capacity and the scratch row; the first `kept` rows are copied over.

        On the CPU from calloc (numpy's zeros): the pages are the kernel's zero pages until written, so a
        million keys' gigabyte is not written twice (zeroed, then loaded)."""
        shape = (num_layers, len(self._keys) + 1, hidden_size)
        if self.device.type == "cpu":
            h, c = (torch.from_numpy(np.zeros(shape, self.element.storage)).view(self.dtype) for _ in range(2))
        else:
            h, c = (torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(2))
        if kept:
            h[:, :kept] = self._h[:, :kept]
            c[:, :kept] = self._c[:, :kept]
        self._h: torch.Tensor = h
        self._c: torch.Tensor = c
        self.storage_generation += 1

    def copy(self) -> StateTable:
        """Another table holding the same keys and state, as unchanged (for a second model to go on from)."""
        other = StateTable(self._h.shape[0], self._h.shape[2], self.device, max(len(self._rows), 1), self.element.name)
        if self._rows:
            other.load(self.export(list(self._rows.values())))
        return other

    def keep_pending(self, slots: int, width: int) -> None:
        """Keep per row `slots` x `width` float32 values for a later event of its key to read (live
        accuracy: forecasts awaiting the event they forecast), with `since`, the step count they start
        after: a key's values are its own only from its zeroed start or from where it was loaded (its
        earlier ones are not kept anywhere else), never a former key's of the same row."""
        self.pending = np.zeros((len(self._keys), slots, width), np.float32)
        self.since = self.steps.numpy().copy()

    def keep_outputs(self, width: int) -> None:
        """Keep each row's last `width` outputs (the key's last prediction, for GET /keys), NaN until its
        key steps: a key loaded or fetched back has none (the changelog does not hold it)."""
        self.outputs = np.full((len(self._keys), width), np.nan, np.float32)

    def set_outputs(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Each row's last output of a batch in event order (a row repeated keeps its latest)."""
        if self.outputs is not None and len(rows):
            last = len(rows) - 1 - np.unique(rows[::-1], return_index=True)[1]
            self.outputs[rows[last]] = values[last]

    def row(self, key: StateKey) -> int | None:
        return self._rows.get(key)

    def keys(self) -> list[StateKey]:
        return list(self._rows)

    def last_offsets(self, keys: Sequence[StateKey]) -> list[int]:
        """The offset of the last event applied to each key held."""
        return self.offsets[[self._rows[key] for key in keys]].tolist()

    def _keys_of(self, rows: Iterable[int]) -> list[StateKey]:
        """The keys of rows that hold one (the caller knows: a free row's entry is None)."""
        keys = cast(list[StateKey], self._keys)
        return [keys[row] for row in rows]

    def rows(self, keys: Sequence[StateKey]) -> torch.Tensor:
        """Row index of each key, giving a key seen for the first time a zeroed row."""
        rows = self._rows
        out, new = [], []
        for key in keys:
            row = rows.get(key)
            if row is None:
                row = self._admit(key)
                new.append(row)
            out.append(row)
        if new:
            self._clear(new)
        index = np.array(out, dtype=np.int64)  # 3x faster than torch.tensor(list)
        self._use(index)
        return torch.from_numpy(index)

    def _use(self, rows: np.ndarray) -> None:
        self.used[rows] = self._tick
        self._tick += 1

    def touch(self, keys: Sequence[StateKey]) -> list[StateKey]:
        """Mark the keys held as used now; returns the others, each once, in order."""
        held: list[int] = []
        missing: dict[StateKey, None] = {}
        for key in keys:
            row = self._rows.get(key)
            if row is None:
                missing[key] = None
            else:
                held.append(row)
        self._use(np.array(held, dtype=np.int64))
        return list(missing)

    def dropped(self, key: StateKey) -> bool:
        """Whether `key` was dropped since the last take (its tombstone is not written yet)."""
        return key in self._dropped

    def _admit_all(self, keys: Sequence[StateKey]) -> torch.Tensor:
        """Rows for keys about to be overwritten whole (a restore's): those of keys not held are taken
        from the free list in bulk and not cleared."""
        held = self._rows
        if any(key in held for key in keys):
            return self.rows(keys)
        taken = self._free[len(self._free) - len(keys):][::-1]
        del self._free[len(self._free) - len(keys):]
        held.update(zip(keys, taken))
        for row, key in zip(taken, keys):
            self._keys[row] = key
        index = np.array(taken, dtype=np.int64)
        self.shards[index] = [key[0] for key in keys]
        return torch.from_numpy(index)

    def _admit(self, key: StateKey) -> int:
        if not self._free:
            self._grow(self._capacity_for(len(self._keys) + 1))
        row = self._free.pop()
        self._rows[key] = row
        self._keys[row] = key
        self.shards[row] = key[0]
        return row

    def _clear(self, rows: list[int]) -> None:
        idx = torch.tensor(rows, dtype=torch.int64)
        dev = idx.to(self.device, non_blocking=True)
        self._h.index_fill_(1, dev, 0.0)
        self._c.index_fill_(1, dev, 0.0)
        self.steps[idx] = 0
        self.offsets[rows] = -1
        self.times[rows] = 0
        self.taken[rows] = 0
        if self.since is not None:
            self.since[rows] = 0
        if self.outputs is not None:
            self.outputs[rows] = np.nan

    def _capacity_for(self, needed: int) -> int:
        """Doubling (amortised O(1) per key), but not past `max_rows` when that is enough."""
        doubled = max(needed, 2 * len(self._keys))
        return min(doubled, max(needed, self.max_rows)) if self.max_rows else doubled

    def _grow(self, capacity: int) -> None:
        """Grow to `capacity` rows (admitting doubles it: amortised O(1) per key)."""
        old = len(self._keys)
        extra = capacity - old
        self._keys.extend([None] * extra)
        self._allocate(self._h.shape[0], self._h.shape[2], kept=old)
        self.steps = torch.cat([self.steps, self.steps.new_zeros(extra)])
        self.offsets = np.concatenate([self.offsets, np.full(extra, -1, dtype=np.int64)])
        self.times = np.concatenate([self.times, np.zeros(extra, dtype=np.int64)])
        self.shards = np.concatenate([self.shards, np.full(extra, -1, dtype=np.int64)])
        self.used = np.concatenate([self.used, np.zeros(extra, dtype=np.int64)])
        self.taken = np.concatenate([self.taken, np.zeros(extra, dtype=np.int64)])
        if self.pending is not None and self.since is not None:
            self.pending = np.concatenate([self.pending, np.zeros((extra, *self.pending.shape[1:]), np.float32)])
            self.since = np.concatenate([self.since, np.zeros(extra, dtype=np.int64)])
        if self.outputs is not None:
            self.outputs = np.concatenate([self.outputs, np.full((extra, self.outputs.shape[1]), np.nan, np.float32)])
        self._free.extend(range(capacity - 1, old - 1, -1))

    def reset(self, rows: list[int]) -> None:
        """Zero rows in place (a reset, or an expired key seen again): the key starts over."""
        self._clear(rows)

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' h and c in float32, for a step (the stored values themselves in float32)."""
        h, c = self._select(rows)
        return h.float(), c.float()

    def _select(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = rows.to(self.device, non_blocking=True)
        return self._h.index_select(1, idx), self._c.index_select(1, idx)

    def scatter(self, rows: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Store a step's result (rounded to the table's element type) and return each row's step count
        after it.

        Rows must be distinct: index_copy_ with duplicate indices is undefined.
        """
        idx = rows.to(self.device, non_blocking=True)
        self._h.index_copy_(1, idx, h.to(self.dtype))
        self._c.index_copy_(1, idx, c.to(self.dtype))
        return self.stepped(rows)

    def stepped(self, rows: torch.Tensor) -> torch.Tensor:
        """Count one step on each (distinct) row and mark it changed; returns the step counts after it.

        `scatter` does this; a step that writes h and c itself (the CUDA graph) calls it directly.
        """
        self.steps[rows] += 1
        self._dirty.update(rows.tolist())
        return self.steps[rows]

    def stamp(self, rows: np.ndarray, offsets: np.ndarray, times: np.ndarray) -> None:
        """Record the offset and time of events applied; a row repeated keeps its latest."""
        np.maximum.at(self.offsets, rows, offsets)
        np.maximum.at(self.times, rows, times)

    def time_of(self, key: StateKey) -> int | None:
        row = self._rows.get(key)
        return None if row is None else int(self.times[row])

    def drop(self, keys: Iterable[StateKey], offsets: Iterable[int]) -> None:
        """Remove keys for good (end, reset, expiry): each becomes a tombstone at the given offset."""
        for key, offset in zip(keys, offsets):
            row = self._rows.pop(key, None)
            if row is not None:
                self._release(row)
            self._dropped[key] = max(offset, self._dropped.get(key, offset))

    def _release(self, row: int) -> None:
        self._keys[row] = None
        self.shards[row] = -1
        self._dirty.discard(row)
        self._free.append(row)

    def forget(self, keys: Iterable[StateKey]) -> None:
        """Remove keys from memory only, without a tombstone (state kept nowhere else: the library's drop)."""
        self._forget(list(dict.fromkeys(row for row in map(self._rows.get, keys) if row is not None)))

    def forget_shard(self, shard: int) -> int:
        """Remove a shard's keys from memory only (it moved elsewhere); its changelog stays as it is."""
        count = self._forget(np.flatnonzero(self.shards == shard).tolist())
        self._dropped = {key: offset for key, offset in self._dropped.items() if key[0] != shard}
        return count

    def restart(self, num_layers: int, hidden_size: int) -> None:
        """Forget every key and take on a state shape: a new model that does not carry the old state on.

        Nothing is tombstoned: the restore rule skips the old model's records for the new one.
        """
        self._forget(np.flatnonzero(self.shards >= 0).tolist())
        if (num_layers, hidden_size) != (self._h.shape[0], self._h.shape[2]):
            self._allocate(num_layers, hidden_size)

    def _forget(self, rows: list[int]) -> int:
        for row, key in zip(rows, self._keys_of(rows)):
            del self._rows[key]
            self._release(row)
        return len(rows)

    def expire(self, cutoffs: dict[int, int]) -> list[StateKey]:
        """Drop the keys whose last event time is before their shard's cutoff; tombstoned at their offset."""
        by_shard = np.full(max(cutoffs, default=0) + 2, np.iinfo(np.int64).min, dtype=np.int64)
        for shard, cutoff in cutoffs.items():
            by_shard[shard] = cutoff
        shards = np.where(self.shards < len(by_shard), self.shards, -1)  # -1: free rows, never idle
        rows = np.flatnonzero(self.times < by_shard[shards])
        keys = self._keys_of(rows.tolist())
        self.drop(keys, self.offsets[rows].tolist())
        return keys

    def live_shards(self) -> list[int]:
        return np.unique(self.shards[self.shards >= 0]).tolist()

    def latest_time(self, shard: int) -> int | None:
        """The newest event time among a shard's keys: the shard's stream time."""
        mine = self.shards == shard
        return int(self.times[mine].max()) if mine.any() else None

    def export(self, rows: Sequence[int]) -> Rows:
        """The rows' state on the host, as stored (in the table's element type)."""
        idx = torch.tensor(rows, dtype=torch.int64)
        h, c = (t.cpu().view(self.storage).numpy() for t in self._select(idx))
        return Rows(self._keys_of(rows), h, c, self.steps[idx].numpy(), self.offsets[rows], self.times[rows])

    def evict(self, count: int) -> Evicted:
        """Take the `count` least recently used keys out (no tombstone: their state lives on elsewhere)."""
        live = np.flatnonzero(self.shards >= 0)
        count = min(count, len(live))
        rows = live[np.argpartition(self.used[live], count - 1)[:count]] if count else live[:0]
        rows_ = rows.tolist()
        out = Evicted(self.export(rows_), np.array([row in self._dirty for row in rows_], dtype=bool),
                      self.taken[rows].copy())
        self._forget(rows_)
        return out

    def mark_changed(self, keys: Iterable[StateKey] | None = None) -> None:
        """Count the keys held among `keys` (None: all) as changed, so the next take writes them out: state
        that came from elsewhere than this table's own changelog (a promoted shadow's)."""
        rows = self._rows.values() if keys is None else map(self._rows.get, keys)
        self._dirty.update(row for row in rows if row is not None)

    def take_changes(self, seq: int = 0) -> Changes:
        """The changes since the last take; `seq` (increasing) marks the rows as taken by this take."""
        dirty = sorted(self._dirty)
        changed = self.export(dirty)
        self.taken[dirty] = seq
        dropped = list(self._dropped.items())
        self._dirty, self._dropped = set(), {}
        return Changes(dropped, changed)

    def _to_device(self, values: np.ndarray) -> torch.Tensor:
        """Host rows as the table's element type on its device; to CUDA through pinned memory (torch's
        caching host allocator), so a batch of fetched or restored keys travels as one DMA."""
        host = torch.from_numpy(values).view(self.dtype)
        return host.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else host

    def load(self, state: Rows, seq: int | np.ndarray = 0, dirty: np.ndarray | None = None) -> None:
        """Install restored (or fetched) keys, replacing whatever the table held for them; they count as
        unchanged, taken by take `seq`, except those `dirty` marks changed. Their h and c are in the
        table's element type (changelog.decode converts)."""
        needed = len(self._rows) + len(state.keys)
        if needed > len(self._keys):
            self._grow(self._capacity_for(needed))  # a restore loads partition after partition
        rows = self._admit_all(state.keys)
        idx = rows.to(self.device)
        for stored, values in ((self._h, state.h), (self._c, state.c)):
            stored.index_copy_(1, idx, self._to_device(values))
        self.steps[rows] = torch.from_numpy(state.steps)
        index = rows.numpy()
        self.offsets[index] = state.offsets
        self.times[index] = state.times
        self.taken[index] = seq
        if self.since is not None:
            self.since[index] = state.steps
        if self.outputs is not None:
            self.outputs[index] = np.nan
        self._use(index)
        self._dirty.difference_update(rows.tolist())
        if dirty is not None:
            self._dirty.update(index[dirty].tolist())
