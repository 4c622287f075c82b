"""Checkpoints: what makes a crash lose nothing and apply nothing twice.

In this order, as Quix Streams and Kafka Streams do: expire idle keys → produce the changelog records
of every key dropped or changed since the last checkpoint → wait until the broker acknowledges all
predictions, dead letters and state records → commit the consumer offsets of every partition whose
records were all acknowledged. Each state record carries the input offset of the last event it reflects,
so a restore can ignore records newer than the commit.

Sending ten thousand state records takes a few hundred milliseconds of the serving thread; done in one
go it would hold every event arriving meanwhile. So the daemon takes a snapshot (the changes and the
offsets they reflect) and sends it a slice per poll, committing once all of it is acknowledged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import NamedTuple

from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from ..config import StateConfig
from ..state import changelog
from ..state.table import StateTable
from ..transport.kafka_python import Failure, KafkaIO
from .metrics import Metrics

log = logging.getLogger(__name__)


StateRecord = tuple[int, bytes, bytes | None, list[tuple[str, bytes]] | None]  # partition, key, value, headers


class Outcome(NamedTuple):
    """A finished checkpoint: input partitions committed, and those left uncommitted because the broker
    refused some of their records (the caller must redo them from their last commit)."""

    committed: set[int]
    failed: dict[int, Failure]


@dataclass
class _Snapshot:
    """A checkpoint under way: the state records still to send, and the offsets they make committable."""

    started: float
    offsets: dict[TopicPartition, OffsetAndMetadata]
    records: list[StateRecord]
    size: int
    sent: int = 0


class Checkpointer:
    """Writes checkpoints, whole (`checkpoint`) or a slice at a time between polls (`begin`, `write`,
    `finish`), so that events keep flowing while thousands of keys' state records are sent."""

    def __init__(self, io: KafkaIO, table: StateTable, metrics: Metrics, topic: str, cfg: StateConfig,
                 model_version: str) -> None:
        self.io = io
        self.table = table
        self.metrics = metrics
        self.topic = topic
        self.cfg = cfg
        self.model_version = model_version
        self._snapshot: _Snapshot | None = None

    @property
    def writing(self) -> bool:
        return self._snapshot is not None

    def checkpoint(self) -> Outcome:
        """A whole checkpoint now (after finishing one under way): on stop, before a model swap, and
        under exactly_once, where everything sent between two commits is one transaction."""
        if self._snapshot is not None:
            self.write(None)
            earlier = self.finish()
            if earlier.failed:  # those partitions are redone; committing them now would skip their events
                return earlier
        else:
            earlier = Outcome(set(), {})
        self.begin()
        self.write(None)
        outcome = self.finish()
        return Outcome(earlier.committed | outcome.committed, outcome.failed)

    def begin(self) -> None:
        """Expire, then take the state of every key dropped or changed since the last checkpoint and the
        offsets it reflects. Later events change the table, not this snapshot."""
        self.expire()
        records, size = self._records()
        self._snapshot = _Snapshot(time.perf_counter(), self.io.pending(), records, size)

    def _records(self) -> tuple[list[StateRecord], int]:
        """The changelog records of the table's changes, tombstones first (a key dropped and seen again
        has both, in that order), and their bytes."""
        changes = self.table.take_changes()
        records: list[StateRecord] = [(shard, key.encode(), None, changelog.tombstone_headers(offset))
                                      for (shard, key), offset in changes.dropped]
        values = changelog.encode(changes.changed, self.model_version)
        records += [(shard, key.encode(), value, None) for (shard, key), value in zip(changes.changed.keys, values)]
        return records, sum(map(len, values))

    def write(self, budget: int | None) -> bool:
        """Send up to `budget` more of the snapshot's state records (all if None); True once all are sent."""
        s = self._snapshot
        end = len(s.records) if budget is None else min(len(s.records), s.sent + budget)
        for record in s.records[s.sent:end]:
            self.io.send_state(self.topic, *record)
        s.sent = end
        return end == len(s.records)

    def finish(self) -> Outcome:
        """Wait until the broker acknowledges everything sent so far, then commit the snapshot's offsets
        of every partition none of whose records it refused."""
        s, self._snapshot = self._snapshot, None
        if not s.offsets and not s.records:
            return Outcome(set(), {})
        failed = self.io.flush()
        committed = {tp: meta for tp, meta in s.offsets.items() if tp.partition not in failed}
        self.io.commit(committed)
        m = self.metrics
        m.checkpoints.inc()
        m.checkpoint_duration.observe(time.perf_counter() - s.started)
        m.checkpoint_keys.observe(len(s.records))
        m.checkpoint_bytes.observe(s.size)
        return Outcome({tp.partition for tp in committed}, failed)

    def on_revoked(self, partitions: set[TopicPartition]) -> None:
        """Everything written and the partitions committed before their new owner starts on them.

        On the consumer's IO thread (so the commit is asynchronous). A snapshot under way is sent in full
        and forgets the revoked partitions: committing its older offsets later would move them back.
        """
        if self._snapshot is not None:
            self.write(None)
            self.forget(partitions)
        for record in self._records()[0]:
            self.io.send_state(self.topic, *record)
        self.io.commit_revoked(partitions)

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Partitions no longer ours: a snapshot under way does not commit them."""
        if self._snapshot is not None:
            for tp in partitions:
                self._snapshot.offsets.pop(tp, None)

    def expire(self) -> None:
        """Drop keys idle longer than state.ttl_seconds, on the configured clock."""
        if not self.cfg.ttl_seconds:
            return
        ttl_ms = int(self.cfg.ttl_seconds * 1000)
        if self.cfg.ttl_clock == "event_time":
            cutoffs = {s: self.table.latest_time(s) - ttl_ms for s in self.table.live_shards()}
        else:
            now_ms = int(time.time() * 1000)
            cutoffs = {s: now_ms - ttl_ms for s in self.table.live_shards()}
        expired = self.table.expire(cutoffs)
        if expired:
            self.metrics.dropped_keys.labels("expired").inc(len(expired))
            self.metrics.live_keys.set(len(self.table))
            log.info("expired %d keys idle longer than %s s", len(expired), self.cfg.ttl_seconds)
