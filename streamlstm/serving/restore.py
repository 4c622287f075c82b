"""Restore: each newly assigned partition's keys are rebuilt from its changelog partition.

Only the partitions being restored are paused; the others keep flowing, because the changelog is read
a poll at a time between input polls, by a consumer of its own. A partition this daemon already held
before a rebalance keeps its in-memory state when consumption resumes exactly where that state stands.
A partition whose outputs the broker refused is rewound: back to its last commit, state included.
"""

from __future__ import annotations

import logging
import time
from itertools import groupby
from operator import attrgetter

from ..state.changelog import PartitionRestore
from ..state.table import StateTable
from ..transport.api import ChangelogSource, TopicPartition, Transport
from .metrics import Metrics

log = logging.getLogger(__name__)

RESTORE_POLL_MS = 50


class Restorer:
    def __init__(self, io: Transport, reader: ChangelogSource, input_topic: str, table: StateTable,
                 metrics: Metrics, accepts: tuple[int, int, str | None]) -> None:
        self.io = io
        self.reader = reader
        self.input_topic = input_topic
        self.table = table
        self.metrics = metrics
        self.accepts = accepts  # (num_layers, hidden_size, model version or None for any): what state fits
        self.assigned: set[TopicPartition] = set()
        self.restored_once = False  # every partition of an assignment (even an empty one) is restored
        self._waiting: set[TopicPartition] = set()
        self._active: dict[int, tuple[PartitionRestore, float]] = {}
        self._reflects: dict[TopicPartition, int] = {}  # next input offset the in-memory state stands at
        self._kept: dict[TopicPartition, int] = {}
        self._rewinding: set[TopicPartition] = set()  # to seek back to their committed offset first
        self._hold_until = 0.0  # no restore begins before this (monotonic): the rewind's backoff
        self._assignments = 0

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._active)

    def on_revoked(self, partitions: set[TopicPartition]) -> None:
        """Remember where each partition's state stands, in case the group gives it straight back."""
        for tp in partitions:
            if self._cancel(tp):
                continue
            done = self.io.done(tp)
            stands = done if done is not None else self._reflects.get(tp)
            if stands is not None:
                self._kept[tp] = stands

    def on_assigned(self, partitions: set[TopicPartition]) -> None:
        for tp in self.assigned - partitions:
            self.table.forget_shard(tp.partition)
            self._kept.pop(tp, None)
            self._rewinding.discard(tp)
        self.assigned = set(partitions)
        self._waiting = set(partitions)
        self._assignments += 1
        self.io.pause(self._waiting)
        self.metrics.restoring.set(len(self._waiting))

    def on_lost(self, partitions: set[TopicPartition]) -> None:
        """Another member owns them now: drop their state unwritten, it may be ahead of the commit."""
        self._drop(partitions)
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
            self.table.forget_shard(tp.partition)
            self._kept.pop(tp, None)
            self._reflects.pop(tp, None)
            self._rewinding.discard(tp)

    def _cancel(self, tp: TopicPartition) -> bool:
        """Abandon a partition's pending or running restore; returns whether there was one."""
        if self._active.pop(tp.partition, None) is not None:
            self.reader.stop({tp.partition})
            self.table.forget_shard(tp.partition)
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
                self._active[partition][0].add_many(records)  # a poll's records come partition by partition
            for partition in self.reader.caught_up() & self._active.keys():
                self._finish(partition)
        self.metrics.restoring.set(len(self._active))
        if self._assignments and not self.busy:
            self.restored_once = True

    def _begin(self) -> None:
        """Start restoring waiting partitions whose start offset is known (a broker may not answer yet)."""
        if time.monotonic() < self._hold_until:
            return
        started: set[int] = set()
        try:
            for tp in sorted(self._waiting):
                if self._begin_one(tp):
                    started.add(tp.partition)
        finally:  # a broker that does not answer for one partition (TransportError) holds up no other
            if started:
                self.reader.start(started)

    def _begin_one(self, tp: TopicPartition) -> bool:
        """True: `tp` is to be read from the changelog (the reader starts it); False: it resumed with its
        state kept in memory, or its position is not known yet (tried again next step)."""
        if tp in self._rewinding:
            self.io.rewind(tp)
            self._rewinding.discard(tp)
        cut = self.io.position(tp)
        if cut is None:
            return False
        self._waiting.discard(tp)
        if self._kept.pop(tp, None) == cut:
            log.info("partition %d: state kept in memory, resuming at offset %d", tp.partition, cut)
            self._reflects[tp] = cut
            self.io.resume({tp})
            return False
        self.table.forget_shard(tp.partition)
        self._active[tp.partition] = (PartitionRestore(tp.partition, cut), time.perf_counter())
        return True

    def _finish(self, partition: int) -> None:
        fold, started = self._active.pop(partition)
        self.reader.stop({partition})
        state, incompatible = fold.rows(*self.accepts)
        self.table.load(state)
        tp = TopicPartition(self.input_topic, partition)
        self._reflects[tp] = fold.cut
        self.io.resume({tp})
        m = self.metrics
        seconds = time.perf_counter() - started
        m.restore_duration.observe(seconds)
        m.restored_keys.inc(len(state.keys))
        m.restore_skipped.labels("beyond_cut").inc(fold.skipped_beyond_cut)
        m.restore_skipped.labels("incompatible").inc(incompatible)
        m.restore_skipped.labels("unreadable").inc(fold.unreadable)
        m.live_keys.set(len(self.table))
        log.info("partition %d: restored %d keys in %.2f s (cut at input offset %d; %d records beyond it, "
                 "%d of another model's shape, %d unreadable)", partition, len(state.keys), seconds, fold.cut,
                 fold.skipped_beyond_cut, incompatible, fold.unreadable)
