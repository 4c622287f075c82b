"""The Kafka side of the daemon: consume; produce predictions, dead letters and state records; commit
safely; read a changelog back.

Offsets are committed only after the broker has acknowledged every record produced for them (flush,
then commit), so a crash can repeat work but never lose an event. Knows nothing of torch or models.
"""

from __future__ import annotations

import logging
from typing import Protocol

from kafka import (
    ConsumerRebalanceListener,
    KafkaAdminClient,
    KafkaConsumer,
    KafkaProducer,
    TopicPartition,
)
from kafka.admin import NewTopic
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import (
    CommitFailedError,
    RebalanceInProgressError,
    TopicAlreadyExistsError,
)
from kafka.structs import OffsetAndMetadata

from .config import KafkaConfig

log = logging.getLogger(__name__)

# Batches of 256 KiB: a checkpoint writes many state records at once (16 KiB made 4x more requests).
PRODUCER_SETTINGS = {"acks": "all", "linger_ms": 5, "batch_size": 256 * 1024}

DLQ_REASON = "streamlstm.reason"
DLQ_DETAIL = "streamlstm.detail"
DLQ_SOURCE = "streamlstm.source"


class TopicError(RuntimeError):
    """A topic the daemon needs is missing or shaped wrongly; the message says what to change."""


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


def ensure_changelog(cfg: KafkaConfig, changelog: str) -> int:
    """Create the compacted state changelog with one partition per input partition; check an existing one.

    Returns the partition count. A changelog with another partition count would put keys' state in the
    wrong partitions, so it stops startup.
    """
    admin = KafkaAdminClient(bootstrap_servers=cfg.bootstrap_servers, client_id=f"{cfg.client_id}-admin")
    try:
        counts = {t["name"]: len(t["partitions"]) for t in admin.describe_topics([cfg.input_topic, changelog])
                  if not t.get("error_code")}
        if cfg.input_topic not in counts:
            raise TopicError(f"input topic {cfg.input_topic!r} does not exist; create it, or set "
                             "kafka.create_topics: true")
        partitions = counts[cfg.input_topic]
        if changelog not in counts:
            try:
                admin.create_topics([NewTopic(changelog, partitions, 1, topic_configs={"cleanup.policy": "compact"})])
                log.info("created changelog topic %s with %d partitions", changelog, partitions)
            except TopicAlreadyExistsError:
                pass
        elif counts[changelog] != partitions:
            raise TopicError(f"changelog topic {changelog!r} has {counts[changelog]} partitions but input topic "
                             f"{cfg.input_topic!r} has {partitions}; they must match (state follows the input "
                             "partition): recreate the changelog or set state.changelog_topic to a new name")
        return partitions
    finally:
        admin.close()


def isolation_level(cfg: KafkaConfig) -> str:
    """Under exactly_once, records of aborted transactions (ours or upstream's) are never read."""
    return "read_committed" if cfg.processing_guarantee == "exactly_once" else "read_uncommitted"


class Rebalance(Protocol):
    """What the owner of per-partition state does when the group moves partitions.

    Called on kafka-python's IO thread, inside poll() or close(): no blocking consumer calls here.
    """

    def on_revoked(self, partitions: set[TopicPartition]) -> None: ...

    def on_assigned(self, partitions: set[TopicPartition]) -> None: ...

    def on_lost(self, partitions: set[TopicPartition]) -> None: ...


class KafkaIO:
    """One consumer in the group plus one producer; tracks what may be committed."""

    def __init__(self, cfg: KafkaConfig, rebalance: Rebalance) -> None:
        self.cfg = cfg
        self.transactional = cfg.processing_guarantee == "exactly_once"
        self._in_transaction = False
        self._done: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._send_error: Exception | None = None
        self.producer = KafkaProducer(
            bootstrap_servers=cfg.bootstrap_servers, client_id=f"{cfg.client_id}-producer", **PRODUCER_SETTINGS,
            transactional_id=cfg.transactional_id_or_default() if self.transactional else None,
        )
        if self.transactional:
            self.producer.init_transactions()  # fences a predecessor with our id, aborting its transaction
        self.consumer = KafkaConsumer(
            bootstrap_servers=cfg.bootstrap_servers, client_id=cfg.client_id, group_id=cfg.group_id,
            enable_auto_commit=False, auto_offset_reset=cfg.auto_offset_reset,
            session_timeout_ms=cfg.session_timeout_ms, heartbeat_interval_ms=cfg.heartbeat_interval_ms,
            max_poll_records=cfg.max_poll_records, fetch_max_wait_ms=cfg.fetch_max_wait_ms,
            isolation_level=isolation_level(cfg),
        )
        self.consumer.subscribe([cfg.input_topic], listener=_Listener(rebalance))

    def poll(self, timeout_ms: int | None = None) -> list[ConsumerRecord]:
        """Records of one poll, partition by partition in offset order."""
        timeout = self.cfg.poll_timeout_ms if timeout_ms is None else timeout_ms
        batches = self.consumer.poll(timeout_ms=timeout, max_records=self.cfg.max_poll_records)
        return [record for records in batches.values() for record in records]

    def _send(self, topic: str, **record: object) -> None:
        """Under exactly_once, everything sent between two checkpoints is one transaction."""
        if self.transactional:
            self._ensure_transaction()
        self.producer.send(topic, **record).add_errback(self._failed)

    def send_prediction(self, key: bytes, value: bytes) -> None:
        self._send(self.cfg.output_topic, key=key, value=value)

    def send_dead_letter(self, record: ConsumerRecord, reason: str, detail: str) -> None:
        """The original key and value bytes, untouched; why and where from in the headers."""
        headers = [
            (DLQ_REASON, reason.encode()),
            (DLQ_DETAIL, detail.encode("utf-8", "replace")),
            (DLQ_SOURCE, f"{record.topic}/{record.partition}/{record.offset}".encode()),
        ]
        self._send(self.cfg.dlq_topic, key=record.key, value=record.value, headers=headers)

    def send_state(self, topic: str, partition: int, key: bytes, value: bytes | None,
                   headers: list[tuple[str, bytes]] | None = None) -> None:
        """A changelog record, into the partition that matches the key's input partition."""
        self._send(topic, key=key, value=value, partition=partition, headers=headers)

    def _failed(self, exc: Exception) -> None:
        self._send_error = self._send_error or exc

    def mark_done(self, records: list[ConsumerRecord]) -> None:
        """Records whose outputs have been sent (not yet acknowledged)."""
        for record in records:
            self._done[TopicPartition(record.topic, record.partition)] = record.offset + 1

    def done(self, tp: TopicPartition) -> int | None:
        """The next offset to process on a partition, as far as this consumer has got."""
        return self._done.get(tp)

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

    def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        """Commit offsets whose records the broker has acknowledged (call flush first).

        Under exactly_once the offsets join the open transaction, which then commits as a whole.
        """
        if self.transactional:
            self._commit_transaction(offsets)
        elif offsets:
            try:
                self.consumer.commit(offsets)
            except (CommitFailedError, RebalanceInProgressError) as exc:
                log.warning("offset commit refused (%s): the group has moved on; the next poll rejoins it, and "
                            "the events since the last commit will be processed again by their new owner", exc)
                return
        self._remember(offsets)

    def _ensure_transaction(self) -> None:
        if not self._in_transaction:
            self.producer.begin_transaction()
            self._in_transaction = True

    def _commit_transaction(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        if offsets:
            self._ensure_transaction()
        if not self._in_transaction:
            return
        if offsets:
            self.producer.send_offsets_to_transaction(offsets, self.consumer.group_metadata())
        self.producer.commit_transaction()
        self._in_transaction = False

    def abort(self) -> None:
        """Drop the open transaction (exactly_once): its outputs are never visible to read_committed."""
        if self._in_transaction:
            self.producer.abort_transaction()
            self._in_transaction = False

    def commit_revoked(self, partitions: set[TopicPartition]) -> None:
        """Flush and commit partitions being taken away, before the new owner starts on them.

        Called on the consumer's IO thread: the producer flush may block, the commit must be async.
        Under exactly_once the whole transaction commits (it spans every partition's outputs).
        """
        if self.transactional:
            offsets = self.pending()
            self._commit_transaction(offsets)
            self._remember(offsets)
            self.forget(partitions)
            return
        offsets = self.pending(partitions)
        try:
            self.flush()
        except DeliveryError:
            log.exception("not committing revoked partitions %s", sorted(tp.partition for tp in partitions))
            offsets = {}
        if offsets:
            self.consumer.commit_async(offsets)
            self._remember(offsets)
        self.forget(partitions)

    def _remember(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        self._committed.update({tp: meta.offset for tp, meta in offsets.items()})

    def forget(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            self._done.pop(tp, None)
            self._committed.pop(tp, None)

    def position(self, tp: TopicPartition) -> int:
        """Where consumption of a partition resumes: the committed offset right after an assignment."""
        return self.consumer.position(tp)

    def pause(self, partitions: set[TopicPartition]) -> None:
        self.consumer.pause(*partitions)

    def resume(self, partitions: set[TopicPartition]) -> None:
        self.consumer.resume(*partitions)

    def lag(self) -> dict[TopicPartition, int]:
        out = {}
        for tp in self.consumer.assignment():
            end = self.consumer.highwater(tp)
            if end is not None:
                out[tp] = max(end - self.consumer.position(tp), 0)
        return out

    def close(self) -> None:
        """Leave the group so partitions move on at once, not after a session timeout."""
        try:
            self.consumer.close(autocommit=False)
        finally:
            self.producer.close()


class ChangelogReader:
    """Reads changelog partitions from their beginning to their current end, several at a time.

    A consumer of its own, outside the group: restoring one partition never holds up the others.
    """

    def __init__(self, cfg: KafkaConfig, topic: str) -> None:
        self.topic = topic
        self.consumer = KafkaConsumer(
            bootstrap_servers=cfg.bootstrap_servers, client_id=f"{cfg.client_id}-restore", group_id=None,
            enable_auto_commit=False, max_poll_records=cfg.max_poll_records, fetch_max_wait_ms=cfg.fetch_max_wait_ms,
            isolation_level=isolation_level(cfg),
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
        batches = self.consumer.poll(timeout_ms=timeout_ms)
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


class _Listener(ConsumerRebalanceListener):
    def __init__(self, rebalance: Rebalance) -> None:
        self.rebalance = rebalance

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.rebalance.on_revoked(set(revoked))

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.rebalance.on_assigned(set(assigned))

    def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self.rebalance.on_lost(set(lost))
