"""A bound on the keys resident in the state table (`state.max_resident_keys`): beyond it the least
recently used keys are evicted, and fetched back exactly (their changelog value, float32) before their
next step, all the missed keys of a batch in one go.

A key not in the table lives, in this order: in the entries evicted here, while its partition's local
store does not hold its latest state yet (it changed since the last take of changes, which must still
write it to the changelog, or the take that did is not written to the store yet; a key dropped since
is such an entry too, with no value); else in the local store (state/store.py); else nowhere: a new key.
An evicted change thus reaches the changelog and the store through the next checkpoint like any other,
and the store never holds a state ahead of its committed offset. Knows nothing of Kafka.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from . import changelog
from .store import Entry, LocalStores, StoreError
from .table import Changes, Rows, StateKey, StateTable

EVICT_SLACK = 16  # evict 1/16 of the bound beyond what a batch needs: the LRU scan is then rare
WAITING_SHARE = 8  # once evicted keys waiting for the store pass 1/8 of the bound, wait for its writer


class _Evicted(NamedTuple):
    value: bytes | None  # None: dropped
    dirty: bool  # changed since the last take: the next take writes it
    seq: int  # the take that took it


class Admitted(NamedTuple):
    """What making a batch's keys resident did, for the metrics."""

    evicted: int
    hits: int  # missing keys found evicted or in a store
    misses: int  # missing keys found nowhere: new
    seconds: float
    failed: set[int]  # partitions whose store could not be read: to be restored anew


class ResidentKeys:
    def __init__(self, table: StateTable, stores: LocalStores, limit: int, accepts: tuple[int, int, str | None],
                 version: str) -> None:
        """`limit`: 0 for no bound. `accepts`: what stored state the served model takes (layers, hidden and,
        under reset_state, its version), as for a restore; `version`: the served model's."""
        self.table = table
        self.stores = stores
        self.limit = limit
        self.accepts = accepts
        self.version = version
        self._evicted: dict[int, dict[str, _Evicted]] = {}
        table.max_rows = limit

    def __len__(self) -> int:
        return len(self.table)

    def evicted_pending(self) -> int:
        """Evicted keys held here until their store has them."""
        return sum(map(len, self._evicted.values()))

    def admit(self, keys: Sequence[StateKey]) -> Admitted | None:
        """Make `keys` resident before their step: the missing ones fetched (or new), the least recently
        used others evicted to keep the bound. None without a bound."""
        if not self.limit:
            return None
        started = time.perf_counter()
        missing = self.table.touch(keys)
        if not missing:
            return Admitted(0, 0, 0, 0.0, set())
        over = len(self.table) + len(missing) - self.limit
        evicted = 0
        if over > 0:
            held = len(set(keys)) - len(missing)  # just touched: the newest, never among the evicted
            evicted = self.evict(min(over + self.limit // EVICT_SLACK, len(self.table) - held))
        hits, failed = self._fetch(missing)
        if self.evicted_pending() > self.limit // WAITING_SHARE:
            self.stores.wait()  # back pressure: evicting faster than the store takes them grows memory
            self._settle()
        return Admitted(evicted, hits, len(missing) - hits, time.perf_counter() - started, failed)

    def evict(self, count: int) -> int:
        """Take the `count` least recently used keys out of the table, keeping here those whose store does
        not have their latest state."""
        out = self.table.evict(count)
        values = changelog.encode(out.rows, self.version)
        written: dict[int, int] = {}
        for (partition, key), value, dirty, seq in zip(out.rows.keys, values, out.dirty.tolist(), out.seqs.tolist()):
            if partition not in written:
                written[partition] = self.stores.written(partition)
            if dirty or seq > written[partition]:
                self._evicted.setdefault(partition, {})[key] = _Evicted(value, dirty, seq)
            elif partition in self._evicted:
                self._evicted[partition].pop(key, None)  # an older entry (a drop's) must not outlive this
        return len(values)

    def _fetch(self, missing: list[StateKey]) -> tuple[int, set[int]]:
        """Load the missing keys' state into the table; returns how many had one, and the partitions whose
        store failed (their keys are not loaded)."""
        by_partition: dict[int, list[str]] = {}
        for partition, key in missing:
            by_partition.setdefault(partition, []).append(key)
        hits, failed = 0, set()
        for partition, names in by_partition.items():
            evicted = self._evicted.get(partition, {})
            found = [(name, evicted.pop(name)) for name in names if name in evicted]  # newer than any drop
            here = {name for name, _ in found}
            wanted = [name for name in names if name not in here and not self.table.dropped((partition, name))]
            try:
                stored = self.stores.fetch(partition, wanted)
            except StoreError:
                failed.add(partition)
                continue
            found += [(name, _Evicted(value, False, 0)) for name, value in stored.items()]
            hits += self._load(partition, [(name, e) for name, e in found if e.value is not None])
        return hits, failed

    def _load(self, partition: int, found: list[tuple[str, _Evicted]]) -> int:
        if not found:
            return 0
        rows = changelog.decode(partition, [name for name, _ in found], [e.value for _, e in found], *self.accepts,
                                self.table.element.name)
        kept = {(partition, name): e for name, e in found}
        entries = [kept[key] for key in rows.keys]
        self.table.load(rows, np.array([e.seq for e in entries], dtype=np.int64),
                        np.array([e.dirty for e in entries], dtype=bool))
        return len(rows.keys)

    def take_changes(self, seq: int) -> Changes:
        """The table's changes and those of the keys evicted since the last take, taken by take `seq`."""
        changes = self.table.take_changes(seq)
        if not self.limit:
            return changes
        self._settle()
        for partition, entries in self._evicted.items():
            for key, e in entries.items():
                if e.dirty:
                    changes.encoded.append(((partition, key), e.value))  # type: ignore[arg-type]
                    entries[key] = e._replace(dirty=False, seq=seq)
        for (partition, key), _ in changes.dropped:  # unless seen again since: resident, or evicted again
            if self.table.row((partition, key)) is None:
                self._evicted.setdefault(partition, {}).setdefault(key, _Evicted(None, False, seq))
        return changes

    def _settle(self) -> None:
        """Forget the evicted keys whose store has their state now."""
        for partition, entries in self._evicted.items():
            written = self.stores.written(partition)
            for key in [key for key, e in entries.items() if not e.dirty and e.seq <= written]:
                del entries[key]

    def load_restored(self, partition: int, state: Rows, entries: Iterable[Entry], seq: int) -> None:
        """A restored partition's keys: all resident within the bound, else the most recent (by offset) that
        fit; the others, and the keys the restore found dropped, stay here until the store write `seq` (of
        `entries`) is done: until then the store may still hold what they were before."""
        room = max(self.limit - len(self.table), 0)
        if not self.limit:
            self.table.load(state, seq)
            return
        resident = state.keys
        if len(state.keys) <= room:
            self.table.load(state, seq)
        else:
            keep = np.sort(np.argsort(-state.offsets, kind="stable")[:room])
            resident = [state.keys[i] for i in keep.tolist()]
            self.table.load(Rows(resident, state.h[:, keep], state.c[:, keep], state.steps[keep],
                                 state.offsets[keep], state.times[keep]), seq)
        names = {name for _, name in resident}
        pending = self._evicted.setdefault(partition, {})
        for name, value in entries:
            if name not in names:
                pending[name] = _Evicted(value, False, seq)

    def stored_value(self, partition: int, name: str) -> bytes | None:
        """An evicted key's latest changelog value, here or in its store (None: not held, or dropped)."""
        if not self.limit or self.table.dropped((partition, name)):  # no bound: every key held is resident
            return None
        evicted = self._evicted.get(partition, {}).get(name)
        if evicted is not None:
            return evicted.value
        try:
            return self.stores.fetch(partition, [name]).get(name)
        except StoreError:
            return None

    def forget_shard(self, shard: int) -> int:
        """A partition's keys out of memory (it moved, or is restored anew); its changelog and store stay."""
        self._evicted.pop(shard, None)
        return self.table.forget_shard(shard)

    def restart(self, num_layers: int, hidden_size: int) -> None:
        """Every key forgotten for a model that does not carry the old state on (see StateTable.restart)."""
        self._evicted.clear()
        self.table.restart(num_layers, hidden_size)
