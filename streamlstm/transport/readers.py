"""Reading topics from their beginning, outside the consumer group: a changelog's partitions for a
restore, a whole topic for training. kafka-python whichever client the daemon consumes with; knows
nothing of torch or of what the records mean.
"""

from __future__ import annotations

import time

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from ..config import KafkaConfig
from .kafka_python import TopicError, client_settings, isolation_level, poll_batches


class ChangelogReader:
    """Reads changelog partitions from their beginning to their current end, several at a time.

    A consumer of its own, outside the group: restoring one partition never holds up the others.
    """

    def __init__(self, cfg: KafkaConfig, topic: str) -> None:
        self.topic = topic
        self.consumer = KafkaConsumer(
            bootstrap_servers=cfg.bootstrap_servers, client_id=f"{cfg.client_id}-restore", group_id=None,
            enable_auto_commit=False, max_poll_records=cfg.max_poll_records, fetch_max_wait_ms=cfg.fetch_max_wait_ms,
            isolation_level=isolation_level(cfg), **client_settings(cfg),
        )

    def start(self, partitions: set[int]) -> None:
        tps = {TopicPartition(self.topic, p) for p in partitions}
        self.consumer.assign(sorted(self.consumer.assignment() | tps))
        self.consumer.seek_to_beginning(*tps)

    def stop(self, partitions: set[int]) -> None:
        tps = {TopicPartition(self.topic, p) for p in partitions}
        self.consumer.assign(sorted(self.consumer.assignment() - tps))

    def poll(self, timeout_ms: int) -> list[ConsumerRecord]:
        if not self.consumer.assignment():
            return []
        batches = poll_batches(self.consumer, self.topic, "The changelog is the daemon's own: set "
                               "state.changelog_topic to a new name (its keys then start from zero state)",
                               timeout_ms=timeout_ms)
        return [record for records in batches.values() for record in records]

    def caught_up(self) -> set[int]:
        """Partitions read up to the end the broker last reported (known after their first fetch).

        The end is the fetch high watermark: Tansu 0.6 answers ListOffsets(latest) with wrong offsets.
        """
        done = set()
        for tp in self.consumer.assignment():
            end = self.consumer.highwater(tp)
            if end is not None and self.consumer.position(tp) >= end:
                done.add(tp.partition)
        return done

    def close(self) -> None:
        self.consumer.close()


def read_topic(cfg: KafkaConfig, topic: str, stall_timeout_s: float = 30.0) -> list[ConsumerRecord]:
    """Every record of every partition of `topic`, from the beginning to its end when reading started.

    The end is the fetch high watermark seen first: Tansu 0.6 answers ListOffsets(latest) with wrong
    offsets. Records appended meanwhile are left out, so the read ends even while producers write.
    """
    consumer = KafkaConsumer(bootstrap_servers=cfg.bootstrap_servers, client_id=f"{cfg.client_id}-train",
                             group_id=None, enable_auto_commit=False, max_poll_records=cfg.max_poll_records,
                             isolation_level=isolation_level(cfg), **client_settings(cfg))
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not partitions:
            raise TopicError(f"topic {topic!r} does not exist on {cfg.bootstrap_servers}")
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends: dict[TopicPartition, int] = {}
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + stall_timeout_s
        while len(ends) < len(partitions) or any(consumer.position(tp) < end for tp, end in ends.items()):
            if time.monotonic() > deadline:
                raise TopicError(f"topic {topic!r}: no progress reading to its end for {stall_timeout_s:.0f} s "
                                 f"(read {len(records)} records); is {cfg.bootstrap_servers} reachable?")
            polled = poll_batches(consumer, topic, "Export its events to a JSONL file with another client and "
                                  "train with --data", timeout_ms=200)
            for tp in partitions:
                if tp not in ends and consumer.highwater(tp) is not None:
                    ends[tp] = consumer.highwater(tp)
            for tp, batch in polled.items():
                records.extend(r for r in batch if r.offset < ends.get(tp, r.offset + 1))
                deadline = time.monotonic() + stall_timeout_s
        return records
    finally:
        consumer.close()
