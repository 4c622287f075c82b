"""Checkpoints: what makes a crash lose nothing and apply nothing twice.

In this order, as Quix Streams and Kafka Streams do: expire idle keys → produce the changelog records
of every key dropped or changed since the last checkpoint → wait until the broker acknowledges all
predictions, dead letters and state records → commit the consumer offsets of every partition whose
records were all acknowledged. Each state record carries the input offset of the last event it reflects,
so a restore can ignore records newer than the commit.
"""

from __future__ import annotations

import logging
import time

from kafka import TopicPartition

from . import changelog
from .config import StateConfig
from .kafka_io import Failure, KafkaIO
from .metrics import Metrics
from .state import StateTable

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, io: KafkaIO, table: StateTable, metrics: Metrics, topic: str, cfg: StateConfig,
                 model_version: str) -> None:
        self.io = io
        self.table = table
        self.metrics = metrics
        self.topic = topic
        self.cfg = cfg
        self.model_version = model_version

    def checkpoint(self) -> dict[int, Failure]:
        """Expire, write changes, flush, commit; returns the input partitions left uncommitted because
        the broker refused some of their records (the caller must redo them from their last commit)."""
        started = time.perf_counter()
        self.expire()
        keys, size = self.write_changes()
        offsets = self.io.pending()
        if not offsets and not keys:
            return {}
        failed = self.io.flush()
        self.io.commit({tp: meta for tp, meta in offsets.items() if tp.partition not in failed})
        m = self.metrics
        m.checkpoints.inc()
        m.checkpoint_duration.observe(time.perf_counter() - started)
        m.checkpoint_keys.observe(keys)
        m.checkpoint_bytes.observe(size)
        return failed

    def on_revoked(self, partitions: set[TopicPartition]) -> None:
        """The same order, on the consumer's IO thread (so the commit is asynchronous)."""
        self.write_changes()
        self.io.commit_revoked(partitions)

    def write_changes(self) -> tuple[int, int]:
        """Tombstones first, then current states: a key dropped and seen again has both, in that order."""
        changes = self.table.take_changes()
        size = 0
        for (shard, key), offset in changes.dropped:
            self.io.send_state(self.topic, shard, key.encode(), None, changelog.tombstone_headers(offset))
        values = changelog.encode(changes.changed, self.model_version)
        for (shard, key), value in zip(changes.changed.keys, values):
            self.io.send_state(self.topic, shard, key.encode(), value)
            size += len(value)
        return len(changes.dropped) + len(values), size

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
