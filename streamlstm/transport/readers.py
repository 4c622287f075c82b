"""Reading topics from an offset, outside the consumer group, on kafka-python: a changelog's
partitions for a restore under `kafka.client: kafka-python` (confluent.py has librdkafka's reader), a
whole topic for training whichever client serves. Knows nothing of torch or of what the records mean.
"""

from __future__ import annotations

import time

from kafka import TopicPartition as KafkaPartition

from ..config import KafkaConfig
from .api import Record, TopicError, TransportError
from .clients import CONSUMER_CALL_TIMEOUT_MS, UNREADABLE_CHANGELOG
from .kafka_python import (
    fetched_end,
    new_consumer,
    poll_records,
    quiet_closing,
    translated,
)


class ChangelogReader:
    """Reads changelog partitions from an offset to their current end, several at a time.

    A consumer of its own, outside the group: restoring one partition never holds up the others.
    """

    def __init__(self, cfg: KafkaConfig, topic: str) -> None:
        self.cfg, self.topic = cfg, topic
        self.consumer = new_consumer(cfg, "-restore", auto_offset_reset="earliest")
        self._read: set[KafkaPartition] = set()  # partitions this consumer has been given, ever

    def start(self, partitions: dict[int, int]) -> None:
        """A partition this consumer read before gets a new consumer (the others carried over at their
        positions): a fetch of it still in flight, answered with the end it had then, would otherwise be
        taken for its end now if it was restarted at the same offset (see stop)."""
        tps = {KafkaPartition(self.topic, p): offset for p, offset in partitions.items()}
        if tps.keys() & self._read:
            kept = {tp: self.consumer.position(tp) for tp in self.consumer.assignment()}  # known: all were sought
            if self._renew():
                tps = kept | tps
        self._read |= tps.keys()
        self.consumer.assign(sorted(self.consumer.assignment() | tps.keys()))
        for tp, offset in tps.items():
            self.consumer.seek(tp, offset)

    def log_start(self, partition: int) -> int:
        tp = KafkaPartition(self.topic, partition)
        with translated():
            return self.consumer.beginning_offsets([tp], timeout_ms=CONSUMER_CALL_TIMEOUT_MS)[tp]

    def stop(self, partitions: set[int]) -> None:
        """The last partition stopped, the consumer is replaced: a fetch answered after that stays queued in
        it (nothing polls it), and would later be taken for the end of a partition restarted at the same
        offset, ending that restore at a stale end (seen: a returning partition restored without the
        records another owner wrote meanwhile)."""
        remaining = sorted(self.consumer.assignment() - {KafkaPartition(self.topic, p) for p in partitions})
        if remaining or not self._renew():
            self.consumer.assign(remaining)

    def _renew(self) -> bool:
        """A new consumer in place of this one, with nothing assigned; False (this one kept) while no
        broker answers: better than none."""
        try:
            with translated():
                fresh = new_consumer(self.cfg, "-restore", auto_offset_reset="earliest")
        except TransportError:
            return False
        self.close()
        self.consumer, self._read = fresh, set()
        return True

    def poll(self, timeout_ms: int) -> list[Record]:
        if not self.consumer.assignment():
            return []
        return poll_records(self.consumer, self.topic, UNREADABLE_CHANGELOG, timeout_ms=timeout_ms)

    def caught_up(self) -> set[int]:
        """Partitions read up to the end the broker last reported (known after their first fetch)."""
        done = set()
        with translated():  # position() may ask the broker
            for tp in self.consumer.assignment():
                end = fetched_end(self.consumer, tp)
                if end is not None and self.consumer.position(tp) >= end:
                    done.add(tp.partition)
        return done

    def close(self) -> None:
        quiet_closing()
        self.consumer.close()


def read_topic(cfg: KafkaConfig, topic: str, stall_timeout_s: float = 30.0) -> list[Record]:
    """Every record of every partition of `topic`, from the beginning to its end when reading started.

    The end is the first fetch's (fetched_end); records appended meanwhile are left out, so the read ends
    even while producers write.
    """
    consumer = new_consumer(cfg, "-train")
    try:
        partitions = [KafkaPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not partitions:
            raise TopicError(f"topic {topic!r} does not exist on {cfg.bootstrap_servers}")
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends: dict[int, int] = {}
        records: list[Record] = []
        deadline = time.monotonic() + stall_timeout_s
        while len(ends) < len(partitions) or any(consumer.position(tp) < ends[tp.partition] for tp in partitions):
            if time.monotonic() > deadline:
                raise TopicError(f"topic {topic!r}: no progress reading to its end for {stall_timeout_s:.0f} s "
                                 f"(read {len(records)} records); is {cfg.bootstrap_servers} reachable?")
            polled = poll_records(consumer, topic, "Export its events to a JSONL file with another client and "
                                  "train with --data", timeout_ms=200)
            for tp in partitions:
                end = fetched_end(consumer, tp)
                if tp.partition not in ends and end is not None:
                    ends[tp.partition] = end
            for record in polled:
                if record.offset < ends.get(record.partition, record.offset + 1):
                    records.append(record)
            if polled:
                deadline = time.monotonic() + stall_timeout_s
        return records
    finally:
        consumer.close()
