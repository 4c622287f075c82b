"""An in-memory Kafka for unit tests of the serving code: no broker, no threads, no sleeps.

`MemoryBroker` holds the topics' logs and the group's committed offsets; `MemoryTransport` is one
member's consumer and producer on it (the real back-ends' `Bookkeeping` plus an in-memory client), and
`MemoryChangelog` reads a topic of it from the beginning, as the restore's ChangelogReader does.

A record sent is in flight until `deliver()` (or `flush()`) hands it to the broker: only then is it in
the log, or, if the broker refuses its partition (`refuse`), reported failed to the bookkeeping, as a
delivery report after the producer's retries would be. `refuse(..., at_send=True)` makes the producer
raise as the record is handed to it instead. Every call the code under test makes is written to
`calls`, so a test can check the order of sends, flushes and commits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from streamlstm.config import KafkaConfig
from streamlstm.transport.api import (
    Failure,
    Offsets,
    Rebalance,
    Record,
    TopicPartition,
    TransportError,
)
from streamlstm.transport.clients import Bookkeeping


class Sent(NamedTuple):
    topic: str
    partition: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None


class Refused(Exception):
    """The broker's answer to a record of a partition it refuses."""


@dataclass
class MemoryBroker:
    log: dict[str, dict[int, list[Sent]]] = field(default_factory=dict)
    committed: Offsets = field(default_factory=dict)  # the group's committed offsets

    def append(self, record: Sent) -> int:
        """Write a record to its partition's log; returns its offset."""
        records = self.records(record.topic, record.partition)
        records.append(record)
        return len(records) - 1

    def records(self, topic: str, partition: int) -> list[Sent]:
        return self.log.setdefault(topic, {}).setdefault(partition, [])


def as_record(sent: Sent, offset: int) -> Record:
    return Record(sent.topic, sent.partition, offset, 0, sent.key, sent.value,
                  [(name, value) for name, value in sent.headers or []])


def describe(offsets: Offsets) -> str:
    return " ".join(f"{tp.topic}/{tp.partition}@{offset}" for tp, offset in sorted(offsets.items()))


class MemoryTransport(Bookkeeping):
    """One group member's consumer and producer on a MemoryBroker (a fresh one unless given)."""

    REVOCATION_WAITS = False  # as kafka-python's, whose callbacks run on its IO thread

    def __init__(self, cfg: KafkaConfig, broker: MemoryBroker | None = None) -> None:
        super().__init__(cfg)
        self.broker = broker if broker is not None else MemoryBroker()
        self.copartitioned = True  # predictions go to their event's partition number
        self.calls: list[str] = []
        self.in_flight: list[tuple[int, Sent, bool]] = []  # (source partition, record, state?) not yet acknowledged
        self.refused: set[tuple[str, int]] = set()
        self.refused_at_send: set[tuple[str, int]] = set()
        self.assignment: set[TopicPartition] = set()
        self.positions: dict[TopicPartition, int] = {}
        self.paused: set[TopicPartition] = set()

    # The test's levers.
    def refuse(self, topic: str, partition: int, at_send: bool = False) -> None:
        """From now on the broker refuses records for this partition: when their delivery is reported
        (deliver, flush), or, `at_send`, as they are handed to the producer."""
        (self.refused_at_send if at_send else self.refused).add((topic, partition))

    def accept(self, topic: str, partition: int) -> None:
        self.refused.discard((topic, partition))
        self.refused_at_send.discard((topic, partition))

    def deliver(self) -> None:
        """The broker's answers to everything in flight arrive: acknowledged records join the log."""
        in_flight, self.in_flight = self.in_flight, []
        for source, record, state in in_flight:
            if (record.topic, record.partition) in self.refused:
                self._fail(source, record.topic, Refused(f"{record.topic}/{record.partition}"))
            else:
                offset = self.broker.append(record)
                if state:
                    self._acked_state(record.topic, record.partition, offset)

    def rebalance(self, listener: Rebalance, assigned: set[TopicPartition], cooperative: bool = False) -> None:
        """An eager rebalance: everything revoked, then `assigned` given, each consuming from its commit.
        Cooperative: only the partitions that go are revoked; those that stay go on where they are."""
        revoked = self.assignment - assigned if cooperative else self.assignment
        if revoked:
            listener.on_revoked(set(revoked))
        kept = self.assignment - revoked
        self.assignment = set(assigned)
        self.positions = {tp: self.positions[tp] if tp in kept else self.broker.committed.get(tp, 0) for tp in assigned}
        self.paused &= kept
        listener.on_assigned(set(assigned))

    # Bookkeeping's client calls.
    def _produce(self, source: int, topic: str, key: bytes | None, value: bytes | None, partition: int | None,
                 headers: list[tuple[str, bytes]] | None, state: bool) -> None:
        record = Sent(topic, source if partition is None else partition, key, value, headers)
        self.calls.append(f"send {topic}/{record.partition} {(key or b'').decode()}"
                          + (" (tombstone)" if value is None else ""))
        if (topic, record.partition) in self.refused_at_send:
            raise TransportError(f"refused at send: {topic}/{record.partition}")
        self.in_flight.append((source, record, state))

    def flush(self) -> dict[int, Failure]:
        self.calls.append("flush")
        self.deliver()
        return self._take_failures()

    def _commit(self, offsets: Offsets, wait: bool) -> None:
        self.calls.append(f"commit {describe(offsets)}".rstrip() + ("" if wait else " (async)"))
        self.broker.committed.update(offsets)

    # The consumer's calls.
    def poll(self, timeout_ms: int | None = None) -> list[Record]:
        records: list[Record] = []
        for tp in sorted(self.assignment - self.paused):
            log = self.broker.records(tp.topic, tp.partition)
            start = self.positions[tp]
            end = max(start, min(len(log), start + self.cfg.max_poll_records - len(records)))
            records += [as_record(log[offset], offset) for offset in range(start, end)]
            self.positions[tp] = end
        return records

    def rewind(self, tp: TopicPartition) -> None:
        self.calls.append(f"rewind {tp.topic}/{tp.partition}")
        self.positions[tp] = self.broker.committed.get(tp, 0)
        self.forget({tp})

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.calls.append(f"seek {tp.topic}/{tp.partition} {offset}")
        self.positions[tp] = offset

    def position(self, tp: TopicPartition) -> int | None:
        return self.positions.get(tp)

    def pause(self, partitions: set[TopicPartition]) -> None:
        self.calls.append(f"pause {sorted(tp.partition for tp in partitions)}")
        self.paused |= partitions

    def resume(self, partitions: set[TopicPartition]) -> None:
        self.calls.append(f"resume {sorted(tp.partition for tp in partitions)}")
        self.paused -= partitions

    def lag(self) -> dict[TopicPartition, int]:
        return {tp: max(len(self.broker.records(tp.topic, tp.partition)) - self.positions[tp], 0)
                for tp in self.assignment}

    def abort(self) -> None:
        self.calls.append("abort")

    def reopen_producer(self) -> None:
        assert not self.in_flight, "reopen_producer() with records in flight"
        self.calls.append("reopen_producer")

    def close(self) -> None:
        self.calls.append("close")
        self.assignment, self.positions, self.paused = set(), {}, set()


class MemoryChangelog:
    """Reads partitions of a MemoryBroker's topic from an offset, at most `batch` records per
    partition per poll. A partition is caught up once a poll has seen its end and read up to it."""

    def __init__(self, broker: MemoryBroker, topic: str, batch: int = 2) -> None:
        self.broker = broker
        self.topic = topic
        self.batch = batch
        self.calls: list[str] = []
        self._next: dict[int, int] = {}
        self._end: dict[int, int] = {}  # the end each partition's last poll saw

    def start(self, partitions: dict[int, int]) -> None:
        self.calls.append(f"start {sorted(partitions.items())}")
        for p, offset in partitions.items():
            self._next[p] = offset if offset <= len(self.broker.records(self.topic, p)) else 0
            self._end.pop(p, None)

    def log_start(self, partition: int) -> int:
        return 0

    def stop(self, partitions: set[int]) -> None:
        self.calls.append(f"stop {sorted(partitions)}")
        for p in partitions:
            self._next.pop(p, None)
            self._end.pop(p, None)

    def poll(self, timeout_ms: int) -> list[Record]:
        records: list[Record] = []
        for p, start in sorted(self._next.items()):
            log = self.broker.records(self.topic, p)
            end = min(len(log), start + self.batch)
            records += [as_record(log[offset], offset) for offset in range(start, end)]
            self._next[p], self._end[p] = end, len(log)
        return records

    def caught_up(self) -> set[int]:
        return {p for p, end in self._end.items() if self._next[p] >= end}

    def close(self) -> None:
        self.calls.append("close")
