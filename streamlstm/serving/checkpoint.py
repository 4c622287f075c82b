"""Checkpoints: what makes a crash lose nothing and apply nothing twice.

In this order, as Quix Streams and Kafka Streams do: expire idle keys → produce the changelog records
of every key dropped or changed since the last checkpoint → wait until the broker acknowledges all
predictions, dead letters and state records → commit the consumer offsets of every partition whose
records were all acknowledged. Each state record carries the input offset of the last event it reflects,
so a restore can ignore records newer than the commit.

Sending ten thousand state records takes a few hundred milliseconds of the serving thread; done in one
go it would hold every event arriving meanwhile. So the daemon takes a snapshot (the changes and the
offsets they reflect) and sends it a slice per poll, committing once all of it is acknowledged.

Once committed, each partition's share of the checkpoint goes to its local store too (state/store.py),
after the commit so that a local store is never ahead of it: a crash between the two leaves the store
behind, and the changelog records after it (its changelog offset) are replayed onto it on restart.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import NamedTuple

from ..state import changelog
from ..state.store import Entry
from ..transport.api import Failure, Offsets, StateRecord, TopicPartition, Transport
from ..faults import crash_point
from .lane import Lane
from .metrics import Metrics
from .plan import Expiry

log = logging.getLogger(__name__)


class Outcome(NamedTuple):
    """A finished checkpoint: input partitions committed, and those left uncommitted because the broker
    refused some of their records (the caller must redo them from their last commit)."""

    committed: set[int]
    failed: dict[int, Failure]


@dataclass
class _Take:
    """One lane's changes in a checkpoint: its changelog records still to send, and per partition the same
    for its local stores."""

    lane: Lane
    seq: int  # the take of changes (LocalStores.issue)
    records: list[StateRecord]
    entries: dict[int, list[Entry]]
    sent: int = 0


@dataclass
class _Snapshot:
    """A checkpoint under way: every lane's state records still to send, and the offsets they make
    committable."""

    started: float
    offsets: Offsets
    takes: list[_Take]
    size: int


class Checkpointer:
    """Writes checkpoints, whole (`checkpoint`) or a slice at a time between polls (`begin`, `write`,
    `finish`), so that events keep flowing while thousands of keys' state records are sent. `lanes`:
    the primary's first, then the shadow's; a shadow of the served version steps nothing and is left
    out (serving/lane.py)."""

    def __init__(self, io: Transport, lanes: list[Lane], metrics: Metrics, expiry: Expiry) -> None:
        self.io = io
        self.lanes = lanes
        self.metrics = metrics
        self.expiry = expiry
        self._snapshot: _Snapshot | None = None

    @property
    def writing(self) -> bool:
        return self._snapshot is not None

    def _serving(self) -> list[Lane]:
        primary = self.lanes[0]
        return [primary] + [lane for lane in self.lanes[1:] if lane.version != primary.version]

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
        offsets it reflects. Later events change the tables, not this snapshot."""
        self.expire()
        takes = [self._take(lane) for lane in self._serving()]
        size = sum(len(value) for take in takes for _, _, value, _ in take.records if value is not None)
        self._snapshot = _Snapshot(time.perf_counter(), self.io.pending(), takes, size)

    def _take(self, lane: Lane) -> _Take:
        """A take of one lane's changes: the changelog records of its table's changes (and of keys evicted
        changed), tombstones first (a key dropped and seen again has both, in that order), and the same
        per partition for the local stores."""
        seq = lane.stores.issue()
        changes = lane.resident.take_changes(seq)
        values = changelog.encode(changes.changed, lane.version)
        changed: list[tuple[int, str, bytes | None, list[tuple[str, bytes]] | None]] = [
            (partition, key, None, changelog.tombstone_headers(offset)) for (partition, key), offset in changes.dropped]
        changed += [(partition, key, value, None) for (partition, key), value in zip(changes.changed.keys, values)]
        changed += [(partition, key, value, None) for (partition, key), value in changes.encoded]
        records: list[StateRecord] = [(partition, key.encode(), value, headers)  # keyed by the event key, UTF-8
                                      for partition, key, value, headers in changed]
        entries: dict[int, list[Entry]] = {}
        for partition, key, value, _ in changed:
            entries.setdefault(partition, []).append((key, value))
        lane.stores.taken(seq, entries)
        return _Take(lane, seq, records, entries)

    def write(self, budget: int | None) -> bool:
        """Send up to `budget` more of the snapshot's state records (all if None); True once all are sent."""
        s = self._snapshot
        assert s is not None, "write() after begin()"
        for take in s.takes:
            end = len(take.records) if budget is None else min(len(take.records), take.sent + budget)
            self.io.send_states(take.lane.changelog_topic, take.records[take.sent:end])
            if budget is not None:
                budget -= end - take.sent
            take.sent = end
            if end < len(take.records):
                return False
        return True

    def finish(self, wait: bool = True) -> Outcome:
        """Wait until the broker acknowledges everything sent so far, then commit the snapshot's offsets
        of every partition none of whose records it refused, and write its changes to the local stores.

        `wait` False: the commit is asynchronous, as the serving loop's are (Kafka's pattern: asynchronous
        in the loop, synchronous on revocation and stop). A synchronous one waits behind any JoinGroup on
        the coordinator's connection, which stops every partition for the rebalance, the cooperative
        protocol's kept ones too. If it then fails, the offsets are committed again by the next checkpoint;
        until then the local stores are ahead of the commit, which a restore after a crash detects.
        """
        s, self._snapshot = self._snapshot, None
        assert s is not None, "finish() after begin()"
        if not s.offsets and not any(take.records for take in s.takes):
            return Outcome(set(), {})
        failed = self.io.flush()
        committed = {tp: offset for tp, offset in s.offsets.items() if tp.partition not in failed}
        if not self.io.commit(committed, wait):
            committed = {}
            for take in s.takes:
                for partition in take.entries.keys() - failed.keys():  # the next commit covers them: so must the store
                    take.lane.stores.hold(partition, take.entries[partition], take.seq)
        else:
            crash_point("after-commit")
            for take in s.takes:
                self._store(take, committed, failed)
        m = self.metrics
        m.checkpoints.inc()
        m.checkpoint_duration.observe(time.perf_counter() - s.started)
        m.checkpoint_keys.observe(sum(len(take.records) for take in s.takes))
        m.checkpoint_bytes.observe(s.size)
        return Outcome({tp.partition for tp in committed}, failed)

    def _store(self, take: _Take, committed: Offsets, failed: dict[int, Failure]) -> None:
        """Each partition's acknowledged records and committed offset into the lane's local store."""
        offsets = {tp.partition: offset for tp, offset in committed.items()}
        table = take.lane.table
        shape = (table.h.shape[0], table.h.shape[2], take.lane.version)
        for partition in (offsets.keys() | take.entries.keys()) - failed.keys():
            take.lane.stores.submit(partition, take.entries.get(partition, []), shape, offsets.get(partition),
                                    self.io.state_end(take.lane.changelog_topic, partition), take.seq)

    def on_revoked(self, partitions: set[TopicPartition]) -> None:
        """Everything written and the partitions committed before their new owner starts on them.

        On the consumer's IO thread (so the commit is asynchronous). A snapshot under way is sent in full
        and forgets the revoked partitions: committing its older offsets later would move them back.
        """
        if self._snapshot is not None:
            self.write(None)
            self.forget(partitions)
        for lane in self._serving():
            take = self._take(lane)
            self.io.send_states(lane.changelog_topic, take.records)
            for partition, changes in take.entries.items():
                lane.stores.hold(partition, changes, take.seq)
        self.io.commit_revoked(partitions)

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Partitions no longer ours: a snapshot under way does not commit them, and their records wait for
        their next commit (or their next restore) to reach their local store."""
        if self._snapshot is not None:
            for tp in partitions:
                self._snapshot.offsets.pop(tp, None)
                for take in self._snapshot.takes:
                    take.lane.stores.hold(tp.partition, take.entries.pop(tp.partition, []), take.seq)

    def expire(self) -> None:
        """Drop keys idle longer than state.ttl_seconds, on the configured clock: each shard's stream time
        (its newest event) on the event clock, now on the processing clock. The primary's times decide:
        every lane steps the same events, so a shadow's keys expire with the primary's."""
        expiry = self.expiry
        if not expiry.ttl_ms:
            return
        now_ms = int(time.time() * 1000)
        table = self.lanes[0].table
        cutoffs = {shard: expiry.cutoff(self._stream_time(shard) if expiry.event_clock else now_ms)
                   for shard in table.live_shards()}
        expired = table.expire(cutoffs)
        for lane in self._serving()[1:]:
            lane.table.expire(cutoffs)
        if expired:
            self.metrics.dropped_keys.labels("expired").inc(len(expired))
            self.metrics.live_keys.set(len(table))
            log.info("expired %d keys idle longer than %s s", len(expired), expiry.ttl_ms / 1000)

    def _stream_time(self, shard: int) -> int:
        latest = self.lanes[0].table.latest_time(shard)
        assert latest is not None, "a live shard has keys"
        return latest
