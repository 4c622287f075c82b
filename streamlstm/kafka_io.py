"""The Kafka side of the daemon: consume, produce predictions and dead letters, commit safely.

Offsets are committed only after the broker has acknowledged every record produced for them (flush,
then commit), so a crash can repeat work but never lose an event. Knows nothing of torch or models.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from .config import KafkaConfig

log = logging.getLogger(__name__)

DLQ_REASON = "streamlstm.reason"
DLQ_DETAIL = "streamlstm.detail"
DLQ_SOURCE = "streamlstm.source"


class DeliveryError(RuntimeError):
    """The broker refused records after the producer's retries; offsets must not move past them."""


def ensure_topics(cfg: KafkaConfig) -> None:
    """Create the input, output and dead-letter topics where missing."""
    admin = KafkaAdminClient(bootstrap_servers=cfg.bootstrap_servers, client_id=f"{cfg.client_id}-admin")
    try:
        missing = {cfg.input_topic, cfg.output_topic, cfg.dlq_topic} - set(admin.list_topics())
        for topic in sorted(missing):
            try:
                admin.create_topics([NewTopic(topic, cfg.topic_partitions, 1)])
                log.info("created topic %s with %d partitions", topic, cfg.topic_partitions)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


class KafkaIO:
    """One consumer in the group plus one producer; tracks what may be committed."""

    def __init__(self, cfg: KafkaConfig, on_assign: Callable[[set[TopicPartition]], None]) -> None:
        self.cfg = cfg
        self._done: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._send_error: Exception | None = None
        self.producer = KafkaProducer(
            bootstrap_servers=cfg.bootstrap_servers, client_id=f"{cfg.client_id}-producer",
            acks="all", linger_ms=5,
        )
        self.consumer = KafkaConsumer(
            bootstrap_servers=cfg.bootstrap_servers, client_id=cfg.client_id, group_id=cfg.group_id,
            enable_auto_commit=False, auto_offset_reset=cfg.auto_offset_reset,
            session_timeout_ms=cfg.session_timeout_ms, heartbeat_interval_ms=cfg.heartbeat_interval_ms,
            max_poll_records=cfg.max_poll_records, fetch_max_wait_ms=cfg.fetch_max_wait_ms,
        )
        self.consumer.subscribe([cfg.input_topic], listener=_Listener(self, on_assign))

    def poll(self) -> list[ConsumerRecord]:
        """Records of one poll, partition by partition in offset order."""
        batches = self.consumer.poll(timeout_ms=self.cfg.poll_timeout_ms, max_records=self.cfg.max_poll_records)
        return [record for records in batches.values() for record in records]

    def send_prediction(self, key: bytes, value: bytes) -> None:
        self.producer.send(self.cfg.output_topic, key=key, value=value).add_errback(self._failed)

    def send_dead_letter(self, record: ConsumerRecord, reason: str, detail: str) -> None:
        """The original key and value bytes, untouched; why and where from in the headers."""
        headers = [
            (DLQ_REASON, reason.encode()),
            (DLQ_DETAIL, detail.encode("utf-8", "replace")),
            (DLQ_SOURCE, f"{record.topic}/{record.partition}/{record.offset}".encode()),
        ]
        self.producer.send(self.cfg.dlq_topic, key=record.key, value=record.value, headers=headers).add_errback(
            self._failed)

    def _failed(self, exc: Exception) -> None:
        self._send_error = self._send_error or exc

    def mark_done(self, records: list[ConsumerRecord]) -> None:
        """Records whose outputs have been sent (not yet acknowledged)."""
        for record in records:
            self._done[TopicPartition(record.topic, record.partition)] = record.offset + 1

    def pending(self, partitions: set[TopicPartition] | None = None) -> dict[TopicPartition, OffsetAndMetadata]:
        return {
            tp: OffsetAndMetadata(offset, "", -1)
            for tp, offset in self._done.items()
            if (partitions is None or tp in partitions) and self._committed.get(tp) != offset
        }

    def flush(self) -> None:
        """Wait for the broker to acknowledge everything sent; raise if anything was refused."""
        self.producer.flush()
        if self._send_error is not None:
            raise DeliveryError(f"the broker refused a produced record: {self._send_error!r}; offsets "
                                "after it are not committed and will be consumed again")

    def checkpoint(self) -> bool:
        """Flush, then commit the done offsets; returns whether anything was committed."""
        offsets = self.pending()
        if not offsets:
            return False
        self.flush()
        self.consumer.commit(offsets)
        self._remember(offsets)
        return True

    def _remember(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        self._committed.update({tp: meta.offset for tp, meta in offsets.items()})

    def revoke(self, partitions: set[TopicPartition]) -> None:
        """Commit what was done on partitions being taken away, before the new owner starts on them.

        Called on the consumer's IO thread: the producer flush may block, the commit must be async.
        """
        offsets = self.pending(partitions)
        if offsets:
            try:
                self.flush()
            except DeliveryError:
                log.exception("not committing revoked partitions %s", sorted(partitions))
                offsets = {}
        if offsets:
            self.consumer.commit_async(offsets)
            self._remember(offsets)
        self.forget(partitions)

    def forget(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            self._done.pop(tp, None)
            self._committed.pop(tp, None)

    def lag(self) -> dict[TopicPartition, int]:
        out = {}
        for tp in self.consumer.assignment():
            end = self.consumer.highwater(tp)
            if end is not None:
                out[tp] = max(end - self.consumer.position(tp), 0)
        return out

    def close(self) -> None:
        """Checkpoint and leave the group so partitions move on at once, not after a session timeout."""
        try:
            self.checkpoint()
        finally:
            self.consumer.close(autocommit=False)
            self.producer.close()


class _Listener(ConsumerRebalanceListener):
    """Runs on kafka-python's IO thread, so it must not block on the consumer (see KafkaIO.revoke)."""

    def __init__(self, io: KafkaIO, on_assign: Callable[[set[TopicPartition]], None]) -> None:
        self.io = io
        self.on_assign = on_assign

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.io.revoke(set(revoked))

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.on_assign(set(self.io.consumer.assignment()))

    def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self.io.forget(set(lost))
