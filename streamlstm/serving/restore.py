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

With a shadow model each partition is restored in both lanes (serving/lane.py), each from its own local
store and changelog, and resumes once both are. A shadow of the served version (promoted) is not
installed: the primary adopts from its fold each key whose newest state of the served version is there
(PartitionRestore.adopt), and writes it to its own changelog at the next checkpoint.
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
from ..transport.api import TopicPartition, Transport
from .lane import Lane
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
    folds: list[PartitionRestore]  # one per lane, in the lanes' order
    reading: set[int]  # the lanes whose fold has not caught up with its changelog yet
    sources: list[str]  # per lane: "local" (seeded from the local store) or "changelog"
    started: float


class Restorer:
    def __init__(self, io: Transport, lanes: list[Lane], input_topic: str, metrics: Metrics) -> None:
        """`lanes`: the primary's first; each lane's `accepts` (num_layers, hidden_size, model version or
        None for any) says what state fits its model."""
        self.io = io
        self.lanes = lanes
        self.input_topic = input_topic
        self.metrics = metrics
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
            self._forget_shard(tp.partition)
            self._kept.pop(tp, None)
            self._rewinding.discard(tp)
            self._assigned_at.pop(tp, None)
        self._disown(gone)
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
        self._disown(partitions)
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

    def _forget_shard(self, shard: int) -> None:
        for lane in self.lanes:
            lane.resident.forget_shard(shard)

    def _disown(self, partitions: set[TopicPartition]) -> None:
        for lane in self.lanes:
            lane.stores.disown(tp.partition for tp in partitions)

    def _drop(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            self._cancel(tp)
            self._forget_shard(tp.partition)
            self._kept.pop(tp, None)
            self._reflects.pop(tp, None)
            self._rewinding.discard(tp)

    def _cancel(self, tp: TopicPartition) -> bool:
        """Abandon a partition's pending or running restore; returns whether there was one."""
        if self._active.pop(tp.partition, None) is not None:
            for lane in self.lanes:
                lane.changelog.stop({tp.partition})
            self._forget_shard(tp.partition)
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
            for i, lane in enumerate(self.lanes):
                if not any(i in restore.reading for restore in self._active.values()):
                    continue
                for partition, records in groupby(lane.changelog.poll(RESTORE_POLL_MS // len(self.lanes)),
                                                  attrgetter("partition")):
                    self._active[partition].folds[i].add_many(records)  # a poll's come partition by partition
                for partition in lane.changelog.caught_up() & self._active.keys():
                    if i in self._active[partition].reading:
                        self._caught_up(partition, i)
            finished = [partition for partition, restore in self._active.items() if not restore.reading]
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
        started: list[dict[int, int]] = [{} for _ in self.lanes]
        try:
            for tp in sorted(self._waiting):
                starts = self._begin_one(tp)
                for lane_started, start in zip(started, starts):
                    lane_started[tp.partition] = start
        finally:  # a broker that does not answer for one partition (TransportError) holds up no other
            for lane, lane_started in zip(self.lanes, started):
                if lane_started:
                    lane.changelog.start(lane_started)

    def _begin_one(self, tp: TopicPartition) -> list[int]:
        """The changelog offset each lane's changelog of `tp` is to be read from (its reader starts it
        there); none: it resumed with its state kept in memory, or its position is not known yet (tried
        again next step)."""
        if tp in self._rewinding:
            self.io.rewind(tp)
            self._rewinding.discard(tp)
        cut = self.io.position(tp)
        if cut is None:
            return []
        self._waiting.discard(tp)
        if self._kept.pop(tp, None) == cut:
            log.info("partition %d: state kept in memory, resuming at offset %d", tp.partition, cut)
            self._reflects[tp] = cut
            self._resume(tp)
            return []
        self._forget_shard(tp.partition)
        folds = [PartitionRestore(tp.partition, cut) for _ in self.lanes]
        starts = [self._seed(lane, fold) for lane, fold in zip(self.lanes, folds)]
        self._active[tp.partition] = _Restore(folds, set(range(len(self.lanes))),
                                              ["changelog" if fold.owner is None else "local" for fold in folds],
                                              time.perf_counter())
        return starts

    def _seed(self, lane: Lane, fold: PartitionRestore) -> int:
        """Seed the fold from the partition's local store of the lane if it is fit to use; the changelog
        offset to read from (0: the whole changelog)."""
        partition = fold.shard
        try:
            stored = lane.stores.read(partition)
        except StoreError as exc:
            self._refuse(lane, partition, "damaged", str(exc))
            return 0
        if stored is None:
            log.info("partition %d: no local store%s; restoring from the changelog", partition, _of(lane))
            return 0
        meta = stored.meta
        refusal = self._refusal(lane, meta, fold.cut, partition)
        if refusal is not None:
            self._refuse(lane, partition, *refusal)
            return 0
        fold.seed(lane.stores.owner, stored.keys, stored.values)
        fold.next_offset = meta.changelog_offset
        crash_point("local-restore")
        log.info("partition %d: %d keys from the local store%s (input offset %d); replaying the changelog from "
                 "offset %d", partition, len(stored.keys), _of(lane), meta.input_offset, meta.changelog_offset)
        return meta.changelog_offset

    def _refusal(self, lane: Lane, meta: StoreMeta, cut: int, partition: int) -> tuple[str, str] | None:
        """Why a local store may not be used, if it may not: (reason label, explanation)."""
        layers, hidden, version = lane.accepts
        owner = lane.stores.owner
        if meta.owner != owner:
            return "owner", f"written under another state.dir (owner {meta.owner}, this one is {owner})"
        if (meta.layers, meta.hidden) != (layers, hidden):
            return "shape", (f"state of {meta.layers} layers x {meta.hidden}, the model's is {layers} x {hidden}")
        if version is not None and meta.model != version:
            return "version", f"written by model {meta.model}; only {version}'s is restored (on_reload: reset_state, or a shadow)"
        if meta.input_offset > cut:
            return "ahead", (f"it reflects input offset {meta.input_offset}, beyond the committed {cut} (a "
                             "checkpoint that was never committed)")
        start = lane.changelog.log_start(partition)
        if meta.changelog_offset < start:
            return "deleted", (f"the changelog after it (from offset {meta.changelog_offset}) is gone: the log starts "
                               f"at {start}")
        return None

    def _refuse(self, lane: Lane, partition: int, reason: str, detail: str) -> None:
        log.warning("partition %d: local store%s not used: %s; restoring from the changelog", partition, _of(lane),
                    detail)
        self.metrics.store_refused.labels(reason).inc()
        lane.stores.store(partition).remove()

    def _caught_up(self, partition: int, i: int) -> None:
        """A lane's fold has read its changelog partition to the end: done, unless it shows that the
        partition was served elsewhere after the local store it was seeded from (then read it all)."""
        restore, lane = self._active[partition], self.lanes[i]
        fold = restore.folds[i]
        if fold.foreign is not None:
            self._refuse(lane, partition, "served_elsewhere",
                         f"owner {fold.foreign} served the partition after it was written")
            restore.folds[i] = PartitionRestore(partition, fold.cut)
            restore.sources[i] = "changelog"
            lane.changelog.start({partition: 0})
            return
        restore.reading.discard(i)
        lane.changelog.stop({partition})

    def _finish(self, partition: int) -> None:
        restore = self._active.pop(partition)
        primary, cut = self.lanes[0], restore.folds[0].cut
        idle = [lane is not primary and lane.version == primary.version for lane in self.lanes]
        adopted = [name for lane, fold, off in zip(self.lanes, restore.folds, idle) if off
                   for name in restore.folds[0].adopt(fold, primary.version)]
        if adopted:
            log.info("partition %d: %d keys take their newest state from the promoted shadow's changelog", partition,
                     len(adopted))
        m = self.metrics
        for lane, fold, source, off in zip(self.lanes, restore.folds, restore.sources, idle):
            if off:
                continue  # a promoted shadow's: nothing of it is served
            restored, incompatible = install(fold, lane.stores, lane.resident, lane.accepts, lane.version)
            self.io.send_states(lane.changelog_topic, [(partition, OWNER_KEY, owner_marker(lane.stores.owner), None)])
            m.restores.labels(source).inc()
            m.restored_keys.labels(source).inc(restored)
            m.restore_replayed.labels(source).inc(fold.replayed)
            m.restore_skipped.labels("beyond_cut").inc(fold.skipped_beyond_cut)
            m.restore_skipped.labels("incompatible").inc(incompatible)
            m.restore_skipped.labels("unreadable").inc(fold.unreadable)
            log.info("partition %d: restored %d keys%s in %.2f s from %s (%d changelog records; cut at input offset "
                     "%d; %d records beyond it, %d of another model's shape, %d unreadable)", partition, restored,
                     _of(lane), time.perf_counter() - restore.started,
                     "the local store and the changelog after it" if source == "local" else "the changelog",
                     fold.replayed, cut, fold.skipped_beyond_cut, incompatible, fold.unreadable)
        primary.table.mark_changed([(partition, name) for name in adopted])  # into its own changelog next
        tp = TopicPartition(self.input_topic, partition)
        self._reflects[tp] = cut
        self._resume(tp)
        m.restore_duration.observe(time.perf_counter() - restore.started)
        m.live_keys.set(len(primary.resident))
        m.store_bytes.set(sum(lane.stores.size() for lane in self.lanes))

    def _resume(self, tp: TopicPartition) -> None:
        self.io.resume({tp})
        assigned = self._assigned_at.pop(tp, None)
        if assigned is not None:
            self.metrics.restore_ready.observe(time.perf_counter() - assigned)


def _of(lane: Lane) -> str:
    """In a log line: which lane's store or keys, where it is not the primary's."""
    return "" if lane.role == "primary" else f" of the {lane.role}"
