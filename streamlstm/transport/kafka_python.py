"""The Transport on kafka-python, the default client: its consumer, producer, transactions and errors.

kafka-python's types stay in here (and in admin.py and readers.py): partitions and offsets cross as
api.TopicPartition and ints, its KafkaError as api.TransportError, and a record it cannot parse as
api.UnreadableRecord. Under exactly_once, everything sent between two checkpoints is one transaction,
which commits with the offsets. Knows nothing of torch or models.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import cast

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka import TopicPartition as KafkaPartition
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import CorruptRecordError, KafkaError
from kafka.producer.future import RecordMetadata
from kafka.structs import OffsetAndMetadata

from ..config import KafkaConfig
from .api import (
    Failure,
    Offsets,
    Rebalance,
    Record,
    TopicPartition,
    TransportError,
    UnreadableRecord,
)
from .clients import (
    CONSUMER_CALL_TIMEOUT_MS,
    PRODUCER_SETTINGS,
    SECURITY_KEYS,
    UNREADABLE_INPUT,
    Bookkeeping,
    isolation_level,
    tls_failure,
)

log = logging.getLogger(__name__)


@contextmanager
def translated() -> Iterator[None]:
    """kafka-python's errors as the TransportError the daemon handles (back off, retry)."""
    try:
        yield
    except KafkaError as exc:
        raise TransportError(f"{type(exc).__name__}: {exc}") from exc


class TlsFailures(logging.Filter):
    """kafka-python logs each failed TLS handshake as two ERRORs (and a WARNING) at every reconnect, for as
    long as the setting stays wrong, naming none of ours: those lines become one warning (tls_failure).
    Its "Bootstrap failed" ERROR that follows, once per client, goes too: the caller gets the error and
    reports it (the daemon: once per kind). On the loggers that write them; `cfg` is the settings the
    process's clients were given."""

    LOGGERS = ("kafka.net.manager", "kafka.net.connection")

    def __init__(self) -> None:
        super().__init__()
        self.cfg: KafkaConfig | None = None
        self.failed = False  # a TLS handshake has failed in this process
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.cfg is None:
            return True
        message = record.getMessage()
        if tls_failure(self.cfg, message):
            self.failed = True
            return False
        return not (self.failed and message.startswith("Bootstrap failed"))


TLS_FAILURES = TlsFailures()


def client_settings(cfg: KafkaConfig) -> dict[str, object]:
    """The SASL/TLS settings every client gets, as kafka-python names them; an empty one is kafka-python's None.
    The TLS failures of clients given them are reported by TLS_FAILURES, naming `cfg`'s settings."""
    TLS_FAILURES.cfg = cfg
    return {key: getattr(cfg, key) if getattr(cfg, key) != "" else None for key in SECURITY_KEYS}


def producer_settings(cfg: KafkaConfig) -> dict[str, object]:
    """PRODUCER_SETTINGS plus the configured codec (kafka-python says None for Kafka's "none")."""
    return PRODUCER_SETTINGS | {"compression_type": None if cfg.compression_type == "none" else cfg.compression_type}


def new_consumer(cfg: KafkaConfig, role: str, **settings: object) -> KafkaConsumer:
    """A consumer of `cfg`'s cluster: no auto-commit, our fetch sizes, isolation and security; `role` names
    it to the broker (client id), `settings` add to these (a group, timeouts)."""
    return KafkaConsumer(bootstrap_servers=cfg.bootstrap_servers, client_id=f"{cfg.client_id}{role}",
                         enable_auto_commit=False, max_poll_records=cfg.max_poll_records,
                         fetch_max_wait_ms=cfg.fetch_max_wait_ms, isolation_level=isolation_level(cfg),
                         **client_settings(cfg) | settings)


def poll_records(consumer: KafkaConsumer, topic: str, remedy: str, **poll: object) -> list[Record]:
    """consumer.poll's records, partition by partition, except that a record kafka-python cannot parse
    stops us, saying what to do: after raising once, kafka-python 3.0 would spin inside the next poll()
    for ever. Its ConsumerRecords are api.Records in all but name (the same fields)."""
    try:
        with translated():
            batches = consumer.poll(**poll)
    except TransportError as exc:
        if isinstance(exc.__cause__, CorruptRecordError):
            raise UnreadableRecord(f"kafka: kafka-python cannot read a record of {topic!r} ({exc.__cause__}): a "
                                   "corrupt batch, or a header name that is not UTF-8 (which Java clients read). "
                                   f"{remedy}") from None
        raise
    return cast(list[Record], [record for records in batches.values() for record in records])


def fetched_end(consumer: KafkaConsumer, tp: KafkaPartition) -> int | None:
    """A partition's end as of its last fetch (the fetch high watermark), None before the first fetch.

    Not consumer.end_offsets(): Tansu 0.6 answers ListOffsets(latest) with wrong offsets.
    """
    return consumer.highwater(tp)

ASSIGNORS = {"range": (RangePartitionAssignor,), "cooperative-sticky": (CooperativeStickyAssignor,)}


def quiet_closing() -> None:
    """Called as a client closes, everything committed: kafka-python 3 may log a race on its own closing
    sockets as an error, from its transport or (a read waiting on a socket just closed: 'Unhandled
    exception in task', ValueError: Invalid file descriptor: -1) from its selector."""
    for name in ("kafka.net.transport", "kafka.net.selector"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def theirs(partitions: Iterable[TopicPartition]) -> list[KafkaPartition]:
    return [KafkaPartition(tp.topic, tp.partition) for tp in partitions]


def ours(partitions: Iterable[KafkaPartition]) -> set[TopicPartition]:
    return {TopicPartition(tp.topic, tp.partition) for tp in partitions}


class KafkaPythonTransport(Bookkeeping):
    """One consumer in the group plus one (transactional under exactly_once) producer."""

    REVOCATION_WAITS = False  # its rebalance callbacks run on its IO thread, which answers the commit

    def __init__(self, cfg: KafkaConfig, rebalance: Rebalance) -> None:
        super().__init__(cfg)
        self.transactional = cfg.processing_guarantee == "exactly_once"
        self._in_transaction = False
        with translated():
            self.producer = self._new_producer()
            self.copartitioned = self._same_partition_count(cfg.input_topic, cfg.output_topic)
            self.consumer = new_consumer(cfg, "", group_id=cfg.group_id,
                                         group_instance_id=cfg.group_instance_id or None,
                                         auto_offset_reset=cfg.auto_offset_reset,
                                         session_timeout_ms=cfg.session_timeout_ms,
                                         heartbeat_interval_ms=cfg.heartbeat_interval_ms,
                                         partition_assignment_strategy=ASSIGNORS[cfg.assignor])
            self.consumer.subscribe([cfg.input_topic], listener=_Listener(rebalance, self.consumer,
                                                                                   cfg.assignor == "cooperative-sticky"))

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
        """Whether predictions can go to their event's partition number (see send_prediction); the
        producer's per-record key hashing (pure Python in kafka-python) is then skipped."""
        try:
            return self.producer.partitions_for(source) == self.producer.partitions_for(sink)
        except KafkaError:
            return False

    def reopen_producer(self) -> None:
        """One that refused records may be left unusable (a fatal idempotence error after a broker lost
        its state)."""
        with translated():
            fresh = self._new_producer()  # may raise (broker away): the old one stays, its sends keep failing
        self.producer.close(timeout=0)
        self.producer, self._in_transaction = fresh, False

    def poll(self, timeout_ms: int | None = None) -> list[Record]:
        timeout = self.cfg.poll_timeout_ms if timeout_ms is None else timeout_ms
        return poll_records(self.consumer, self.cfg.input_topic, UNREADABLE_INPUT, timeout_ms=timeout,
                            max_records=self.cfg.max_poll_records)

    def _produce(self, source: int, topic: str, key: bytes | None, value: bytes | None, partition: int | None,
                 headers: list[tuple[str, bytes]] | None, state: bool) -> None:
        try:
            if self.transactional:
                self._ensure_transaction()
            future = self.producer.send(topic, key=key, value=value, partition=partition,
                                        headers=headers).add_errback(self._fail, source, topic)
            if state:
                future.add_callback(self._acked)
        except KafkaError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc

    def _acked(self, metadata: RecordMetadata) -> None:
        self._acked_state(metadata.topic, metadata.partition, metadata.offset)

    def flush(self) -> dict[int, Failure]:
        """Under exactly_once one refusal aborts the transaction, which fails every partition in it."""
        with translated():
            self.producer.flush()
        failed = self._take_failures()
        if failed and self.transactional:
            self.abort()
            first = next(iter(failed.values()))
            failed = {tp.partition: first for tp in self.pending()} | failed
        return failed

    def _commit(self, offsets: Offsets, wait: bool) -> None:
        """Under exactly_once the offsets join the open transaction, which then commits as a whole. `wait`
        False: asynchronous (on kafka-python's IO thread, inside a rebalance, it must be)."""
        theirs_ = {KafkaPartition(tp.topic, tp.partition): OffsetAndMetadata(offset, "", -1)
                   for tp, offset in offsets.items()}
        with translated():
            if self.transactional:
                self._commit_transaction(theirs_)
            elif not offsets:
                return
            elif wait:
                self.consumer.commit(theirs_, timeout_ms=CONSUMER_CALL_TIMEOUT_MS)
            else:
                self.consumer.commit_async(theirs_, callback=self._async_committed)

    def _async_committed(self, offsets: dict[KafkaPartition, OffsetAndMetadata], result: object) -> None:
        if isinstance(result, Exception):
            self._commit_failed({TopicPartition(tp.topic, tp.partition): o.offset for tp, o in offsets.items()}, result)

    def _ensure_transaction(self) -> None:
        if not self._in_transaction:
            self.producer.begin_transaction()
            self._in_transaction = True

    def _commit_transaction(self, offsets: dict[KafkaPartition, OffsetAndMetadata]) -> None:
        if offsets:
            self._ensure_transaction()
        if not self._in_transaction:
            return
        if offsets:
            self.producer.send_offsets_to_transaction(offsets, self.consumer.group_metadata())
        self.producer.commit_transaction()
        self._in_transaction = False

    def abort(self) -> None:
        """Its outputs are never visible to read_committed consumers."""
        if not self._in_transaction:
            return
        self._in_transaction = False
        try:
            self.producer.abort_transaction()
        except KafkaError as exc:  # a producer in a fatal state cannot; its successor's fencing will
            log.warning("could not abort the transaction (%r); the producer is replaced", exc)

    def _revoked_scope(self, partitions: set[TopicPartition]) -> set[TopicPartition] | None:
        """Under exactly_once the whole transaction commits: it spans every partition's outputs."""
        return None if self.transactional else partitions

    def rewind(self, tp: TopicPartition) -> None:
        """From auto_offset_reset's end if nothing is committed."""
        kafka_tp = KafkaPartition(tp.topic, tp.partition)
        with translated():
            committed = self.consumer.committed(kafka_tp, timeout_ms=CONSUMER_CALL_TIMEOUT_MS)
            if committed is not None:
                self.consumer.seek(kafka_tp, committed)
            elif self.cfg.auto_offset_reset == "earliest":
                self.consumer.seek_to_beginning(kafka_tp)
            else:
                self.consumer.seek_to_end(kafka_tp)
        self.forget({tp})

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.consumer.seek(KafkaPartition(tp.topic, tp.partition), offset)

    def position(self, tp: TopicPartition) -> int | None:
        """The committed offset right after an assignment."""
        with translated():
            return self.consumer.position(KafkaPartition(tp.topic, tp.partition), timeout_ms=CONSUMER_CALL_TIMEOUT_MS)

    def pause(self, partitions: set[TopicPartition]) -> None:
        self.consumer.pause(*theirs(partitions))

    def resume(self, partitions: set[TopicPartition]) -> None:
        self.consumer.resume(*theirs(partitions))

    def lag(self) -> dict[TopicPartition, int]:
        out = {}
        with translated():
            for tp in self.consumer.assignment():
                end = fetched_end(self.consumer, tp)
                if end is not None:
                    out[TopicPartition(tp.topic, tp.partition)] = max(end - self.consumer.position(tp), 0)
        return out

    def close(self) -> None:
        """A dynamic member leaves the group; a static one does not (KIP-345: kafka-python sends no
        LeaveGroup for it), so that it gets its partitions back if it returns within the session."""
        quiet_closing()
        try:
            self.consumer.close(autocommit=False)
        finally:
            self.producer.close()


class _Listener(ConsumerRebalanceListener):
    """Tells the Rebalance the whole assignment each time: under the cooperative protocol kafka-python
    reports only the partitions added, and nothing at all when partitions were only revoked (its
    assignment has changed already when on_partitions_revoked is called)."""

    def __init__(self, rebalance: Rebalance, consumer: KafkaConsumer, cooperative: bool) -> None:
        self.rebalance, self.consumer, self.cooperative = rebalance, consumer, cooperative

    def on_partitions_revoked(self, revoked: set[KafkaPartition]) -> None:
        self.rebalance.on_revoked(ours(revoked))
        if self.cooperative:
            self.rebalance.on_assigned(ours(self.consumer.assignment()))

    def on_partitions_assigned(self, assigned: set[KafkaPartition]) -> None:
        self.rebalance.on_assigned(ours(self.consumer.assignment()))

    def on_partitions_lost(self, lost: set[KafkaPartition]) -> None:
        self.rebalance.on_lost(ours(lost))
