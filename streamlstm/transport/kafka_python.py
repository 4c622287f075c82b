"""The Kafka side of the daemon: consume; produce predictions, dead letters and state records; commit
safely. (Topics read from their beginning, a changelog on restore: topic_readers.py.)

Offsets are committed only after the broker has acknowledged every record produced for them (flush,
then commit), so a crash can repeat work but never lose an event. A record the broker refuses marks its
source partition failed: that partition is not committed and must be redone from its last commit.
Knows nothing of torch or models.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Protocol

from kafka import (
    ConsumerRebalanceListener,
    KafkaConsumer,
    KafkaProducer,
    TopicPartition,
)
from kafka.errors import CorruptRecordError, KafkaError
from kafka.structs import OffsetAndMetadata

from ..config import KafkaConfig
from ..errors import UsageError

log = logging.getLogger(__name__)

# Batches of 256 KiB: a checkpoint writes many state records at once (16 KiB made 4x more requests).
# Bounded waits (kafka-python's are 60 s to block in send() and 120 s to deliver): a record that cannot
# be delivered fails within 20 s and is redone, so the loop never looks hung to its liveness probe.
PRODUCER_SETTINGS = {"acks": "all", "linger_ms": 5, "batch_size": 256 * 1024, "max_block_ms": 5000,
                     "request_timeout_ms": 10000, "delivery_timeout_ms": 20000}
CONSUMER_CALL_TIMEOUT_MS = 5000  # commits and committed-offset lookups while the broker is away

SECURITY_KEYS = ("security_protocol", "sasl_mechanism", "sasl_plain_username", "sasl_plain_password", "ssl_cafile",
                 "ssl_certfile", "ssl_keyfile", "ssl_password", "ssl_check_hostname")

DLQ_PREFIX = "streamlstm."
DLQ_REASON = DLQ_PREFIX + "reason"
DLQ_DETAIL = DLQ_PREFIX + "detail"
DLQ_SOURCE = DLQ_PREFIX + "source"


class TopicError(UsageError):
    """A topic the daemon needs is missing or shaped wrongly; the message says what to change."""


class UnreadableRecord(UsageError):
    """kafka-python cannot parse a record of a topic it reads; the message says what to do."""


UNREADABLE_INPUT = ("Set kafka.client: confluent, which reads such a record without its unreadable headers, or "
                    "move the group past it (kafka-consumer-groups --reset-offsets --shift-by 1 on the partition "
                    "whose lag stopped falling)")


def poll_batches(consumer: KafkaConsumer, topic: str, remedy: str, **poll: object) -> dict[TopicPartition, list]:
    """consumer.poll, except that a record kafka-python cannot parse stops us, saying what to do: after
    raising once, kafka-python 3.0 would spin inside the next poll() for ever."""
    try:
        return consumer.poll(**poll)
    except CorruptRecordError as exc:
        raise UnreadableRecord(f"kafka: kafka-python cannot read a record of {topic!r} ({exc}): a corrupt batch, or "
                               f"a header name that is not UTF-8 (which Java clients read). {remedy}") from None


class Failure(NamedTuple):
    """The first record of a source partition that the broker refused (after the producer's retries)."""

    topic: str
    error: Exception
    offset: int | None = None  # the source record's, when the refusal came as it was sent


def client_settings(cfg: KafkaConfig) -> dict[str, object]:
    """The SASL/TLS settings every client gets, as kafka-python names them; an empty one is kafka-python's None."""
    return {key: getattr(cfg, key) if getattr(cfg, key) != "" else None for key in SECURITY_KEYS}


def producer_settings(cfg: KafkaConfig) -> dict[str, object]:
    """PRODUCER_SETTINGS plus the configured codec (kafka-python says None for Kafka's "none")."""
    return PRODUCER_SETTINGS | {"compression_type": None if cfg.compression_type == "none" else cfg.compression_type}


def isolation_level(cfg: KafkaConfig) -> str:
    """Under exactly_once, records of aborted transactions (ours or upstream's) are never read."""
    return "read_committed" if cfg.processing_guarantee == "exactly_once" else "read_uncommitted"


def forwarded(headers: list[tuple[str, bytes | None]]) -> list[tuple[str, bytes]]:
    """An input record's headers as they are written again, on either client: a null value (Kafka allows
    one, Java clients write them) goes out empty, since kafka-python's producer refuses null values
    (a TypeError that would stop the daemon at that event every time it is read)."""
    return [(name, b"" if value is None else value) for name, value in headers]


class Record(NamedTuple):
    """An input record, as the daemon reads it: confluent_io makes these; kafka-python's ConsumerRecord
    has the same fields under the same names (and more), and is passed as it is. Both are named tuples
    (the daemon cuts an oversized dead letter's bytes with `_replace`)."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]


class Rebalance(Protocol):
    """What the owner of per-partition state does when the group moves partitions.

    Called inside poll() or close() (kafka-python: on its IO thread): no blocking consumer calls here.
    """

    def on_revoked(self, partitions: set[TopicPartition]) -> None: ...

    def on_assigned(self, partitions: set[TopicPartition]) -> None: ...

    def on_lost(self, partitions: set[TopicPartition]) -> None: ...


def open_io(cfg: KafkaConfig, rebalance: Rebalance) -> KafkaIO:
    """The daemon's consumer and producer, with the client `kafka.client` names."""
    if cfg.client == "confluent":
        from .confluent import (
            ConfluentIO,  # an optional dependency, imported only when chosen
        )

        return ConfluentIO(cfg, rebalance)
    return KafkaIO(cfg, rebalance)


class KafkaIO:
    """One consumer in the group plus one producer; tracks what may be committed.

    The bookkeeping here is the client's; the calls into kafka-python are the methods that
    confluent_io.ConfluentIO overrides.
    """

    def __init__(self, cfg: KafkaConfig, rebalance: Rebalance) -> None:
        self.cfg = cfg
        self.transactional = cfg.processing_guarantee == "exactly_once"
        self._in_transaction = False
        self._done: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._failed: dict[int, Failure] = {}  # by source partition; written on the producer's thread too
        self.producer = self._new_producer()
        self.copartitioned = self._same_partition_count(cfg.input_topic, cfg.output_topic)
        self.consumer = self._subscribe(rebalance)

    def _subscribe(self, rebalance: Rebalance) -> KafkaConsumer:
        cfg = self.cfg
        consumer = KafkaConsumer(
            bootstrap_servers=cfg.bootstrap_servers, client_id=cfg.client_id, group_id=cfg.group_id,
            enable_auto_commit=False, auto_offset_reset=cfg.auto_offset_reset,
            session_timeout_ms=cfg.session_timeout_ms, heartbeat_interval_ms=cfg.heartbeat_interval_ms,
            max_poll_records=cfg.max_poll_records, fetch_max_wait_ms=cfg.fetch_max_wait_ms,
            isolation_level=isolation_level(cfg), **client_settings(cfg),
        )
        consumer.subscribe([cfg.input_topic], listener=_Listener(rebalance))
        return consumer

    def _new_producer(self) -> KafkaProducer:
        cfg = self.cfg
        producer = KafkaProducer(
            bootstrap_servers=cfg.bootstrap_servers, client_id=f"{cfg.client_id}-producer", **producer_settings(cfg),
            transactional_id=cfg.transactional_id_or_default() if self.transactional else None,
            **client_settings(cfg),
        )
        if self.transactional:
            producer.init_transactions()  # fences a predecessor with our id, aborting its transaction
        return producer

    def _same_partition_count(self, source: str, sink: str) -> bool:
        """Whether a prediction can go to its event's partition number: with as many output partitions
        as input ones, each key's predictions then sit beside its events and its state (co-partitioned,
        as Kafka Streams requires of topics to be joined), and the producer's per-record key hashing
        (pure Python in kafka-python) is skipped. Otherwise the producer hashes the key."""
        try:
            return self._partitions(source) == self._partitions(sink)
        except KafkaError:
            return False

    def _partitions(self, topic: str) -> set[int]:
        return self.producer.partitions_for(topic)

    def reopen_producer(self) -> None:
        """Replace a producer that refused records: one may be left unusable (a fatal idempotence
        error after a broker lost its state). Call only when nothing is in flight."""
        fresh = self._new_producer()  # may raise (broker away): the old one stays, its sends keep failing
        self._close_producer(timeout_s=0)
        self.producer, self._in_transaction = fresh, False

    def _close_producer(self, timeout_s: float | None = None) -> None:
        self.producer.close(timeout=timeout_s)

    def poll(self, timeout_ms: int | None = None) -> list[Record]:
        """Records of one poll, partition by partition in offset order."""
        timeout = self.cfg.poll_timeout_ms if timeout_ms is None else timeout_ms
        batches = poll_batches(self.consumer, self.cfg.input_topic, UNREADABLE_INPUT, timeout_ms=timeout,
                               max_records=self.cfg.max_poll_records)
        return [record for records in batches.values() for record in records]

    def _send(self, source: int, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None,
              headers: list[tuple[str, bytes]] | None = None, offset: int | None = None) -> None:
        """Never raises: a refusal, now or after the producer's retries, fails the source partition.

        A failed partition's records after the failed one are not even sent: it will be redone from its
        last commit. `offset` is the source record's (None: a state record, after everything): a poll's
        dead letters go out before its predictions, so the predictions of the events before a refused
        dead letter are still sent. Under exactly_once, everything sent between two checkpoints is one
        transaction.
        """
        failure = self._failed.get(source)
        if failure is not None and (offset is None or failure.offset is None or offset > failure.offset):
            return
        try:
            if self.transactional:
                self._ensure_transaction()
            self._produce(source, topic, key, value, partition, headers)
        except KafkaError as exc:
            self._fail(source, topic, exc, offset)

    def _produce(self, source: int, topic: str, key: bytes | None, value: bytes | None, partition: int | None,
                 headers: list[tuple[str, bytes]] | None) -> None:
        """Hand one record to the producer; a refusal later fails `source`. May raise KafkaError."""
        self.producer.send(topic, key=key, value=value, partition=partition,
                           headers=headers).add_errback(self._fail, source, topic)

    def _fail(self, source: int, topic: str, error: Exception, offset: int | None = None) -> None:
        self._failed.setdefault(source, Failure(topic, error, offset))

    def send_prediction(self, record: Record, value: bytes) -> None:
        """With the event's headers (trace context, correlation ids), as Kafka Streams forwards them."""
        partition = record.partition if self.copartitioned else None
        self._send(record.partition, self.cfg.output_topic, key=record.key, value=value, partition=partition,
                   headers=forwarded(record.headers) if record.headers else None, offset=record.offset)

    def send_dead_letter(self, record: Record, reason: str, detail: str) -> None:
        """The original key, value and headers (a null header value empty), so it can be fixed and sent
        again; why and where from in headers of ours (replacing any from an earlier pass through the dead-letter topic)."""
        headers = [
            *(header for header in forwarded(record.headers) if not header[0].startswith(DLQ_PREFIX)),
            (DLQ_REASON, reason.encode()),
            (DLQ_DETAIL, detail.encode("utf-8", "replace")),
            (DLQ_SOURCE, f"{record.topic}/{record.partition}/{record.offset}".encode()),
        ]
        self._send(record.partition, self.cfg.dlq_topic, key=record.key, value=record.value, headers=headers,
                   offset=record.offset)

    def send_state(self, topic: str, partition: int, key: bytes, value: bytes | None,
                   headers: list[tuple[str, bytes]] | None = None) -> None:
        """A changelog record, into the partition that matches the key's input partition."""
        self._send(partition, topic, key=key, value=value, partition=partition, headers=headers)

    def mark_done(self, records: list[Record]) -> None:
        """Records whose outputs have been sent (not yet acknowledged): a partition's last one counts."""
        last = {(record.topic, record.partition): record.offset for record in records}
        for (topic, partition), offset in last.items():
            self._done[TopicPartition(topic, partition)] = offset + 1

    def done(self, tp: TopicPartition) -> int | None:
        """The next offset to process on a partition, as far as this consumer has got."""
        return self._done.get(tp)

    def pending(self, partitions: set[TopicPartition] | None = None) -> dict[TopicPartition, OffsetAndMetadata]:
        return {
            tp: OffsetAndMetadata(offset, "", -1)
            for tp, offset in self._done.items()
            if (partitions is None or tp in partitions) and self._committed.get(tp) != offset
        }

    def flush(self) -> dict[int, Failure]:
        """Wait for the broker to acknowledge everything sent; return the source partitions it refused.

        Under exactly_once one refusal aborts the transaction, which fails every partition in it.
        """
        self._flush_producer()
        failed, self._failed = self._failed, {}
        if failed and self.transactional:
            self.abort()
            first = next(iter(failed.values()))
            failed = {tp.partition: first for tp in self.pending()} | failed
        return failed

    def _flush_producer(self) -> None:
        self.producer.flush()

    def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata], wait: bool = True) -> None:
        """Commit offsets whose records the broker has acknowledged (flush first, leave out failures).

        Under exactly_once the offsets join the open transaction, which then commits as a whole. A commit
        that fails is not fatal: the offsets stay pending for the next checkpoint, or, if the group has
        moved the partition, its next owner processes those events again. `wait`: see _commit_offsets.
        """
        try:
            if self.transactional:
                self._commit_transaction(offsets)
            elif offsets:
                self._commit_offsets(offsets, wait)
        except KafkaError as exc:
            log.warning("offset commit failed (%r); retried at the next checkpoint unless the partitions have "
                        "moved, in which case their new owner processes the events since the last commit", exc)
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
        if not self._in_transaction:
            return
        self._in_transaction = False
        try:
            self.producer.abort_transaction()
        except KafkaError as exc:  # a producer in a fatal state cannot; its successor's fencing will
            log.warning("could not abort the transaction (%r); the producer is replaced", exc)

    def commit_revoked(self, partitions: set[TopicPartition]) -> None:
        """Flush and commit partitions being taken away, before the new owner starts on them.

        Called on the consumer's IO thread: the producer flush may block, the commit must be async.
        Under exactly_once the whole transaction commits (it spans every partition's outputs). Failed
        partitions are not committed; the others' failures are kept for the next checkpoint.
        """
        failed = self.flush()
        self._failed.update({p: f for p, f in failed.items() if TopicPartition(self.cfg.input_topic, p)
                             not in partitions})
        if failed:
            log.warning("not committing revoked partitions %s: the broker refused their records (%r)",
                        sorted(failed), next(iter(failed.values())).error)
        pending = self.pending(None if self.transactional else partitions)
        self.commit({tp: m for tp, m in pending.items() if tp.partition not in failed}, wait=False)
        self.forget(partitions)

    def _commit_offsets(self, offsets: dict[TopicPartition, OffsetAndMetadata], wait: bool) -> None:
        """`wait`: a synchronous commit; otherwise asynchronous (on kafka-python's IO thread it must be)."""
        if wait:
            self.consumer.commit(offsets, timeout_ms=CONSUMER_CALL_TIMEOUT_MS)
        else:
            self.consumer.commit_async(offsets)

    def _remember(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        self._committed.update({tp: meta.offset for tp, meta in offsets.items()})

    def forget(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            self._done.pop(tp, None)
            self._committed.pop(tp, None)

    def rewind(self, tp: TopicPartition) -> None:
        """Consume a partition again from its committed offset (from auto_offset_reset's end if none)."""
        committed = self.consumer.committed(tp, timeout_ms=CONSUMER_CALL_TIMEOUT_MS)
        if committed is not None:
            self.consumer.seek(tp, committed)
        elif self.cfg.auto_offset_reset == "earliest":
            self.consumer.seek_to_beginning(tp)
        else:
            self.consumer.seek_to_end(tp)
        self.forget({tp})

    def position(self, tp: TopicPartition) -> int:
        """Where consumption of a partition resumes: the committed offset right after an assignment."""
        return self.consumer.position(tp, timeout_ms=CONSUMER_CALL_TIMEOUT_MS)

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
            self._close_producer()


class _Listener(ConsumerRebalanceListener):
    def __init__(self, rebalance: Rebalance) -> None:
        self.rebalance = rebalance

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.rebalance.on_revoked(set(revoked))

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.rebalance.on_assigned(set(assigned))

    def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self.rebalance.on_lost(set(lost))
