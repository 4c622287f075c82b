"""Restore: each newly assigned partition's keys are rebuilt from its local store and the changelog
records written after it, or, with no local store fit to use, from its whole changelog partition.

A local store is used only if it is whole (readable, every checksum right), this directory's, of the
served model's shape (and version, under reset_state), not ahead of the committed input offset, and the
changelog after it is still all there; once its changelog tail is read, also only if no other owner's
marker is in it (the partition was served elsewhere since: its keys may have moved on). Otherwise the
partition restores from the whole changelog, with a log line and a metric saying why. Either way the fold
is the same (state/changelog.py), so the state is the same: every key as of the committed offset. The
result is written back to the local store, and an owner marker to the changelog.

Only the partitions being restored are paused; the others keep flowing, because the changelog is read
a poll at a time between input polls, by a consumer of its own. A partition this daemon already held
before a rebalance keeps its in-memory state when consumption resumes exactly where that state stands.
A partition whose outputs the broker refused is rewound: back to its last commit, state included.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from itertools import groupby
from operator import attrgetter

from ..faults import crash_point
from ..state import heap
from ..state.changelog import OWNER_KEY, PartitionRestore, owner_marker
from ..state.resident import ResidentKeys
from ..state.store import LocalStores, StoreError, StoreMeta
from ..transport.api import ChangelogSource, TopicPartition, Transport
from .metrics import Metrics

log = logging.getLogger(__name__)

RESTORE_POLL_MS = 50


def install(fold: PartitionRestore, stores: LocalStores, resident: ResidentKeys,
            accepts: tuple[int, int, str | None], version: str) -> tuple[int, int]:
    """A finished fold into the partition's local store and the resident keys: (keys restored, records of
    another model's shape or version). The fold's values and their decoded copy are freed on return."""
    state, incompatible = fold.rows(*accepts, resident.table.element.name)
    layers, hidden, _ = accepts
    entries = fold.entries()
    seq = stores.establish(fold.shard, entries, StoreMeta(stores.owner, layers, hidden, version, fold.cut,
                                                          fold.next_offset), replace=fold.owner is None)
    resident.load_restored(fold.shard, state, entries, seq)
    return len(state.keys), incompatible


@dataclass
class _Restore:
    fold: PartitionRestore
    started: float
    source: str  # "local" (seeded from the local store) or "changelog"


class Restorer:
    def __init__(self, io: Transport, reader: ChangelogSource, topics: tuple[str, str], resident: ResidentKeys,
                 stores: LocalStores, metrics: Metrics, accepts: tuple[int, int, str | None], version: str) -> None:
        self.io = io
        self.reader = reader
        self.input_topic, self.changelog_topic = topics
        self.resident = resident
        self.stores = stores
        self.metrics = metrics
        self.accepts = accepts  # (num_layers, hidden_size, model version or None for any): what state fits
        self.version = version  # the served model's
        self.assigned: set[TopicPartition] = set()
        self.restored_once = False  # every partition of an assignment (even an empty one) is restored
        self._waiting: set[TopicPartition] = set()
        self._active: dict[int, _Restore] = {}
        self._reflects: dict[TopicPartition, int] = {}  # next input offset the in-memory state stands at
        self._kept: dict[TopicPartition, int] = {}
        self._revoked: set[TopicPartition] = set()  # since the last assignment
        self._rewinding: set[TopicPartition] = set()  # to seek back to their committed offset first
        self._hold_until = 0.0  # no restore begins before this (monotonic): the rewind's backoff
        self._assignments = 0
        self._assigned_at: dict[TopicPartition, float] = {}  # until the partition resumes

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._active)

    @property
    def restoring(self) -> set[TopicPartition]:
        """Partitions paused until their state is restored."""
        return self._waiting | {TopicPartition(self.input_topic, partition) for partition in self._active}

    def on_revoked(self, partitions: set[TopicPartition]) -> None:
        """Remember where each partition's state stands, in case the group gives it straight back."""
        self._revoked |= partitions
        for tp in partitions:
            if self._cancel(tp):
                continue
            done = self.io.done(tp)
            stands = done if done is not None else self._reflects.get(tp)
            if stands is not None:
                self._kept[tp] = stands

    def on_assigned(self, partitions: set[TopicPartition]) -> bool:
        """`partitions` is the whole assignment. Those held and not revoked since (the cooperative protocol
        moves only what changes owner) go on untouched; the others are restored. Returns whether this is
        a new assignment (a transport may report the same one twice)."""
        gone = self.assigned - partitions
        new = partitions - (self.assigned - self._revoked)
        for tp in gone:
            self.resident.forget_shard(tp.partition)
            self._kept.pop(tp, None)
            self._rewinding.discard(tp)
            self._assigned_at.pop(tp, None)
        self.stores.disown(tp.partition for tp in gone)
        self._assigned_at.update(dict.fromkeys(new, time.perf_counter()))
        self.assigned = set(partitions)
        self._revoked.clear()
        self._waiting = (self._waiting & partitions) | new
        self._assignments += 1
        self.io.pause(new)
        self.metrics.restoring.set(len(self._waiting))
        return bool(gone or new) or self._assignments == 1

    def on_lost(self, partitions: set[TopicPartition]) -> None:
        """Another member owns them now: drop their state unwritten, it may be ahead of the commit."""
        self._drop(partitions)
        self.stores.disown(tp.partition for tp in partitions)
        self.assigned -= partitions

    def rewind(self, partitions: set[TopicPartition], hold_s: float) -> None:
        """Redo partitions from their last commit, after `hold_s`: their in-memory state is ahead of it."""
        partitions &= self.assigned
        self._drop(partitions)
        self.io.forget(partitions)  # nothing of theirs is committed from now until they are redone
        self._rewinding |= partitions
        self._waiting |= partitions
        self._hold_until = time.monotonic() + hold_s
        self.io.pause(partitions)

    def _drop(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            self._cancel(tp)
            self.resident.forget_shard(tp.partition)
            self._kept.pop(tp, None)
            self._reflects.pop(tp, None)
            self._rewinding.discard(tp)

    def _cancel(self, tp: TopicPartition) -> bool:
        """Abandon a partition's pending or running restore; returns whether there was one."""
        if self._active.pop(tp.partition, None) is not None:
            self.reader.stop({tp.partition})
            self.resident.forget_shard(tp.partition)
            return True
        if tp in self._waiting:
            self._waiting.discard(tp)
            return True
        return False

    def step(self) -> None:
        """Advance the restores a little; called between input polls."""
        if self._waiting:
            self._begin()
        if self._active:
            for partition, records in groupby(self.reader.poll(RESTORE_POLL_MS), attrgetter("partition")):
                self._active[partition].fold.add_many(records)  # a poll's records come partition by partition
            finished = self.reader.caught_up() & self._active.keys()
            for partition in finished:
                self._finish(partition)
            if finished:
                heap.give_back()  # the folds' values, a kilobyte a key, are freed by now
        self.metrics.restoring.set(len(self._active))
        if self._assignments and not self.busy:
            self.restored_once = True

    def _begin(self) -> None:
        """Start restoring waiting partitions whose start offset is known (a broker may not answer yet)."""
        if time.monotonic() < self._hold_until:
            return
        started: dict[int, int] = {}
        try:
            for tp in sorted(self._waiting):
                start = self._begin_one(tp)
                if start is not None:
                    started[tp.partition] = start
        finally:  # a broker that does not answer for one partition (TransportError) holds up no other
            if started:
                self.reader.start(started)

    def _begin_one(self, tp: TopicPartition) -> int | None:
        """The changelog offset `tp` is to be read from (the reader starts it there); None: it resumed with
        its state kept in memory, or its position is not known yet (tried again next step)."""
        if tp in self._rewinding:
            self.io.rewind(tp)
            self._rewinding.discard(tp)
        cut = self.io.position(tp)
        if cut is None:
            return None
        self._waiting.discard(tp)
        if self._kept.pop(tp, None) == cut:
            log.info("partition %d: state kept in memory, resuming at offset %d", tp.partition, cut)
            self._reflects[tp] = cut
            self._resume(tp)
            return None
        self.resident.forget_shard(tp.partition)
        fold = PartitionRestore(tp.partition, cut)
        start = self._seed(fold)
        self._active[tp.partition] = _Restore(fold, time.perf_counter(), "changelog" if fold.owner is None else "local")
        return start

    def _seed(self, fold: PartitionRestore) -> int:
        """Seed the fold from the partition's local store if it is fit to use; the changelog offset to read
        from (0: the whole changelog)."""
        partition = fold.shard
        try:
            stored = self.stores.read(partition)
        except StoreError as exc:
            self._refuse(partition, "damaged", str(exc))
            return 0
        if stored is None:
            log.info("partition %d: no local store; restoring from the changelog", partition)
            return 0
        meta = stored.meta
        refusal = self._refusal(meta, fold.cut, partition)
        if refusal is not None:
            self._refuse(partition, *refusal)
            return 0
        fold.seed(self.stores.owner, stored.keys, stored.values)
        fold.next_offset = meta.changelog_offset
        crash_point("local-restore")
        log.info("partition %d: %d keys from the local store (input offset %d); replaying the changelog from offset "
                 "%d", partition, len(stored.keys), meta.input_offset, meta.changelog_offset)
        return meta.changelog_offset

    def _refusal(self, meta: StoreMeta, cut: int, partition: int) -> tuple[str, str] | None:
        """Why a local store may not be used, if it may not: (reason label, explanation)."""
        layers, hidden, version = self.accepts
        if meta.owner != self.stores.owner:
            return "owner", f"written under another state.dir (owner {meta.owner}, this one is {self.stores.owner})"
        if (meta.layers, meta.hidden) != (layers, hidden):
            return "shape", (f"state of {meta.layers} layers x {meta.hidden}, the model's is {layers} x {hidden}")
        if version is not None and meta.model != version:
            return "version", f"written by model {meta.model}; under on_reload: reset_state only {version}'s is restored"
        if meta.input_offset > cut:
            return "ahead", (f"it reflects input offset {meta.input_offset}, beyond the committed {cut} (a "
                             "checkpoint that was never committed)")
        start = self.reader.log_start(partition)
        if meta.changelog_offset < start:
            return "deleted", (f"the changelog after it (from offset {meta.changelog_offset}) is gone: the log starts "
                               f"at {start}")
        return None

    def _refuse(self, partition: int, reason: str, detail: str) -> None:
        log.warning("partition %d: local store not used: %s; restoring from the changelog", partition, detail)
        self.metrics.store_refused.labels(reason).inc()
        self.stores.store(partition).remove()

    def _finish(self, partition: int) -> None:
        restore = self._active[partition]
        fold = restore.fold
        if fold.foreign is not None:
            self._refuse(partition, "served_elsewhere", f"owner {fold.foreign} served the partition after it was written")
            self._active[partition] = _Restore(PartitionRestore(partition, fold.cut), restore.started, "changelog")
            self.reader.start({partition: 0})
            return
        del self._active[partition]
        self.reader.stop({partition})
        restored, incompatible = install(fold, self.stores, self.resident, self.accepts, self.version)
        self.io.send_states(self.changelog_topic, [(partition, OWNER_KEY, owner_marker(self.stores.owner), None)])
        tp = TopicPartition(self.input_topic, partition)
        self._reflects[tp] = fold.cut
        self._resume(tp)
        m, source = self.metrics, restore.source
        seconds = time.perf_counter() - restore.started
        m.restore_duration.observe(seconds)
        m.restores.labels(source).inc()
        m.restored_keys.labels(source).inc(restored)
        m.restore_replayed.labels(source).inc(fold.replayed)
        m.restore_skipped.labels("beyond_cut").inc(fold.skipped_beyond_cut)
        m.restore_skipped.labels("incompatible").inc(incompatible)
        m.restore_skipped.labels("unreadable").inc(fold.unreadable)
        m.live_keys.set(len(self.resident))
        m.store_bytes.set(self.stores.size())
        log.info("partition %d: restored %d keys in %.2f s from %s (%d changelog records; cut at input offset %d; "
                 "%d records beyond it, %d of another model's shape, %d unreadable)", partition, restored,
                 seconds, "the local store and the changelog after it" if source == "local" else "the changelog",
                 fold.replayed, fold.cut, fold.skipped_beyond_cut, incompatible, fold.unreadable)

    def _resume(self, tp: TopicPartition) -> None:
        self.io.resume({tp})
        assigned = self._assigned_at.pop(tp, None)
        if assigned is not None:
            self.metrics.restore_ready.observe(time.perf_counter() - assigned)
