"""The Transport on confluent-kafka (librdkafka), chosen by `kafka.client: confluent`.

librdkafka fetches, batches, compresses and retries in C threads, so the per-record Python work left is
one produce() call and one small tuple. Rebalance callbacks and delivery reports run on the calling
thread, inside consume(), poll() and flush(). At-least-once only (config refuses exactly_once with this
client), so no transactions here. Needs neither kafka-python nor torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import cast

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    libversion,
)
from confluent_kafka import TopicPartition as Partition

from ..config import KafkaConfig
from .api import (
    Failure,
    Header,
    Offsets,
    Rebalance,
    Record,
    TopicPartition,
    TransportError,
)
from .clients import (
    CONSUMER_CALL_TIMEOUT_MS,
    PRODUCER_SETTINGS,
    SECURITY_KEYS,
    Bookkeeping,
    isolation_level,
    tls_failure,
    tls_failure_kind,
)

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = CONSUMER_CALL_TIMEOUT_MS / 1000
MAX_BLOCK_S = PRODUCER_SETTINGS["max_block_ms"] / 1000  # a full local queue waits this long, as kafka-python's send
UNASSIGNED = -1  # librdkafka's RD_KAFKA_PARTITION_UA: the partitioner picks


def confluent_settings(cfg: KafkaConfig) -> dict[str, object]:
    """The connection and security settings every client gets, in librdkafka's names."""
    protocol = cfg.security_protocol
    settings: dict[str, object] = {"bootstrap.servers": cfg.bootstrap_servers, "security.protocol": protocol}
    for key, name in SECURITY_KEYS.items():
        value = getattr(cfg, key)
        if key.startswith("sasl_") and protocol.startswith("SASL"):
            settings[name] = value
        elif key.startswith("ssl_") and key != "ssl_check_hostname" and protocol.endswith("SSL") and value:
            settings[name] = value
    if protocol.endswith("SSL"):
        settings[SECURITY_KEYS["ssl_check_hostname"]] = "https" if cfg.ssl_check_hostname else "none"
    return settings


def observed(cfg: KafkaConfig) -> dict[str, object]:
    """librdkafka's log lines through our logging (our format: JSON for a collector) rather than raw on
    stderr, and its errors to a callback: a failed TLS handshake, which it logs and reports at every
    reconnect (each second or so), becomes one warning naming the setting to check (tls_failure)."""
    return {"logger": log, "error_cb": partial(_client_error, cfg)}


def _client_error(cfg: KafkaConfig, error: KafkaError) -> None:
    """Others are what the calls that fail raise (and librdkafka logs): nothing to add."""
    tls_failure(cfg, error.str())


class _NoTlsFailures(logging.Filter):
    """librdkafka's own line for each failed handshake: _client_error reports them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return tls_failure_kind(record.getMessage()) is None


log.addFilter(_NoTlsFailures())


def static_membership(cfg: KafkaConfig) -> dict[str, object]:
    """librdkafka's group.instance.id when kafka.group_instance_id is set (a static member, KIP-345: it
    sends no LeaveGroup on close)."""
    return {"group.instance.id": cfg.group_instance_id} if cfg.group_instance_id else {}


def producer_config(cfg: KafkaConfig) -> dict[str, object]:
    """kafka_io's producer settings in librdkafka's names."""
    settings = PRODUCER_SETTINGS
    return confluent_settings(cfg) | observed(cfg) | {
        "client.id": f"{cfg.client_id}-producer", "acks": settings["acks"], "enable.idempotence": True,
        "linger.ms": settings["linger_ms"], "batch.size": settings["batch_size"],
        "message.max.bytes": settings["max_request_size"],
        "request.timeout.ms": settings["request_timeout_ms"], "message.timeout.ms": settings["delivery_timeout_ms"],
        "compression.type": cfg.compression_type,
        # murmur2, as the Java clients and kafka-python hash keys (librdkafka's default is CRC32):
        # a key's records land in the same partition whichever client wrote them.
        "partitioner": "murmur2_random"}


def _transport_error(exc: KafkaException) -> TransportError:
    """librdkafka's errors as the TransportError the daemon handles (back off, retry)."""
    return TransportError(str(exc.args[0] if exc.args else exc))


@contextmanager
def _kafka_errors() -> Iterator[None]:
    try:
        yield
    except KafkaException as exc:
        raise _transport_error(exc) from exc


def consume_available(consumer: Consumer, most: int, timeout_s: float) -> list[Message]:
    """What is there, up to `most`, as soon as there is anything: librdkafka's consume(n, timeout)
    waits for all n, which at 1 000 events/s held each event ~100 ms."""
    messages = consumer.consume(most, 0)
    if not messages and timeout_s > 0:
        messages = consumer.consume(1, timeout_s)
        if messages and most > 1:
            messages += consumer.consume(most - 1, 0)
    return messages


def _ours(partitions: Iterable[Partition]) -> set[TopicPartition]:
    return {TopicPartition(p.topic, p.partition) for p in partitions}


def _theirs(partitions: Iterable[TopicPartition], offset: Callable[[TopicPartition], int] | None = None) -> list[Partition]:
    return [Partition(tp.topic, tp.partition) if offset is None else Partition(tp.topic, tp.partition, offset(tp))
            for tp in partitions]


def _headers(m: Message) -> list[Header]:
    """A header name that is not UTF-8 (Kafka allows any bytes; Java clients read it) makes confluent-kafka
    raise SystemError: such a record is read without its headers rather than stopping the daemon."""
    try:
        return cast(list[Header], m.headers() or [])  # a list: we never give a dict to produce()
    except SystemError:
        log.warning("%s/%d/%d: a header name is not UTF-8; the record is read without its headers",
                    m.topic(), m.partition(), m.offset())
        return []


def _assigned(rebalance: Rebalance, cooperative: bool, consumer: Consumer, partitions: list[Partition]) -> None:
    """Assigned before the callback, which may pause them; under the cooperative protocol `partitions`
    are only those added, and the Rebalance is told the whole assignment."""
    if cooperative:
        consumer.incremental_assign(partitions)
    else:
        consumer.assign(partitions)
    rebalance.on_assigned(_ours(consumer.assignment()))


def _revoked(rebalance: Rebalance, cooperative: bool, consumer: Consumer, partitions: list[Partition]) -> None:
    """Under the cooperative protocol only the partitions that move are revoked, and no assignment of the
    others need follow: the Rebalance is told what it is now."""
    rebalance.on_revoked(_ours(partitions))
    if cooperative:
        consumer.incremental_unassign(partitions)
        try:
            remaining = consumer.assignment()
        except KafkaException:  # closing: the handle is being destroyed, and nothing stays assigned
            remaining = []
        rebalance.on_assigned(_ours(remaining))


class ConfluentTransport(Bookkeeping):
    """One consumer in the group plus one idempotent producer, on librdkafka."""

    def __init__(self, cfg: KafkaConfig, rebalance: Rebalance) -> None:
        super().__init__(cfg)
        self._delivered: dict[int, Callable[[object, Message], None]] = {}  # one report callback per source
        self._delivered_state: dict[int, Callable[[object, Message], None]] = {}  # and per state partition
        with _kafka_errors():
            self.producer = Producer(producer_config(cfg))
        self.copartitioned = self._same_partition_count(cfg.input_topic, cfg.output_topic)
        self.consumer = self._subscribe(rebalance)

    def _subscribe(self, rebalance: Rebalance) -> Consumer:
        cfg = self.cfg
        with _kafka_errors():
            consumer = Consumer(confluent_settings(cfg) | observed(cfg) | {
                "client.id": cfg.client_id, "group.id": cfg.group_id, "enable.auto.commit": False,
                "auto.offset.reset": cfg.auto_offset_reset, "session.timeout.ms": cfg.session_timeout_ms,
                "heartbeat.interval.ms": cfg.heartbeat_interval_ms, "fetch.wait.max.ms": cfg.fetch_max_wait_ms,
                "isolation.level": isolation_level(cfg), "partition.assignment.strategy": cfg.assignor,
                "on_commit": self._async_committed}
                                | static_membership(cfg))
            cooperative = cfg.assignor == "cooperative-sticky"

            consumer.subscribe([cfg.input_topic], on_assign=partial(_assigned, rebalance, cooperative),
                               on_revoke=partial(_revoked, rebalance, cooperative),
                               on_lost=lambda _, partitions: rebalance.on_lost(_ours(partitions)))
        return consumer

    def _same_partition_count(self, source: str, sink: str) -> bool:
        """Whether predictions can go to their event's partition number (see send_prediction)."""
        try:
            return self._partitions(source) == self._partitions(sink)
        except TransportError:
            return False

    def _partitions(self, topic: str) -> set[int]:
        with _kafka_errors():
            metadata = self.producer.list_topics(topic, timeout=CALL_TIMEOUT_S).topics[topic]
        if metadata.error is not None:
            raise TransportError(str(metadata.error))
        return set(metadata.partitions)

    def reopen_producer(self) -> None:
        """One that refused records may be left unusable (a fatal idempotence error)."""
        with _kafka_errors():
            fresh = Producer(producer_config(self.cfg))  # may raise: the old one stays, its sends keep failing
        self.producer.flush(0)  # librdkafka's producer has no close: let it go
        self.producer = fresh

    def poll(self, timeout_ms: int | None = None) -> list[Record]:
        """Also serves the producer's delivery reports, which is where refusals are noticed."""
        timeout = self.cfg.poll_timeout_ms if timeout_ms is None else timeout_ms
        self.producer.poll(0)
        with _kafka_errors():
            messages = consume_available(self.consumer, self.cfg.max_poll_records, timeout / 1000)
        records = []
        for m in messages:
            error = m.error()
            if error is not None:  # a partition or broker problem; librdkafka retries by itself
                if error.fatal():
                    raise TransportError(str(error))
                continue
            records.append(Record(m.topic(), m.partition(), m.offset(), m.timestamp()[1],  # type: ignore[arg-type]
                                  m.key(), m.value(), _headers(m)))  # a consumed message has topic and offset
        return records

    def _produce(self, source: int, topic: str, key: bytes | None, value: bytes | None, partition: int | None,
                 headers: list[tuple[str, bytes]] | None, state: bool) -> None:
        reports = self._delivered_state if state else self._delivered
        on_delivery = reports.get(source) or reports.setdefault(source, partial(self._report, source, state))
        partition = UNASSIGNED if partition is None else partition
        deadline = None
        while True:  # once per record: plain try/except, no context manager
            try:
                self.producer.produce(topic, value, key, partition, on_delivery=on_delivery,
                                      headers=headers)  # type: ignore[arg-type]  # list invariance: bytes values
                return
            except BufferError:  # the local queue is full: wait for deliveries to make room
                deadline = deadline or time.monotonic() + MAX_BLOCK_S
                if time.monotonic() > deadline:
                    raise TransportError(f"producer queue still full after {MAX_BLOCK_S:.0f} s") from None
                self.producer.poll(0.05)
            except KafkaException as exc:
                raise _transport_error(exc) from exc

    def _report(self, source: int, state: bool, error: object, message: Message) -> None:
        if error is not None:
            self._fail(source, message.topic() or "", TransportError(str(error)))
        elif state:
            self._acked_state(message.topic(), message.partition(), message.offset())  # type: ignore[arg-type]  # delivered: known

    def flush(self) -> dict[int, Failure]:
        self.producer.flush()
        return self._take_failures()

    def _commit(self, offsets: Offsets, wait: bool) -> None:
        """Rebalance callbacks run on our thread: a revoked partition's commit waits, so it lands before
        its next owner reads it. An asynchronous one's answer comes in a later poll (_async_committed)."""
        if offsets:
            theirs_ = _theirs(offsets, offsets.__getitem__)
            with _kafka_errors():
                if wait:
                    self.consumer.commit(offsets=theirs_, asynchronous=False)
                else:
                    self.consumer.commit(offsets=theirs_, asynchronous=True)

    def _async_committed(self, error: KafkaError | None, partitions: list[Partition]) -> None:
        failed = {TopicPartition(p.topic, p.partition): p.offset for p in partitions if error or p.error}
        if failed:
            self._commit_failed(failed, error or next(p.error for p in partitions if p.error))

    def abort(self) -> None:
        """No transactions on this client: nothing to drop."""

    def rewind(self, tp: TopicPartition) -> None:
        """From auto_offset_reset's end if nothing is committed."""
        committed = self._committed_offset(tp)
        if committed is None:
            committed = OFFSET_BEGINNING if self.cfg.auto_offset_reset == "earliest" else OFFSET_END
        with _kafka_errors():
            self.consumer.seek(Partition(tp.topic, tp.partition, committed))
        self.forget({tp})

    def seek(self, tp: TopicPartition, offset: int) -> None:
        with _kafka_errors():
            self.consumer.seek(Partition(tp.topic, tp.partition, offset))

    def _committed_offset(self, tp: TopicPartition) -> int | None:
        with _kafka_errors():
            offset = self.consumer.committed(_theirs([tp]), timeout=CALL_TIMEOUT_S)[0].offset
        return offset if offset >= 0 else None

    def position(self, tp: TopicPartition) -> int | None:
        """librdkafka knows a position only once it has fetched; until then it is the committed offset,
        or the reset policy's end of the partition. None: the broker does not answer yet."""
        position = self.consumer.position(_theirs([tp]))[0].offset
        if position >= 0:
            return position
        try:
            committed = self._committed_offset(tp)
            if committed is not None:
                return committed
            with _kafka_errors():
                low, high = self.consumer.get_watermark_offsets(Partition(tp.topic, tp.partition),
                                                                timeout=CALL_TIMEOUT_S)
        except TransportError:
            return None
        return low if self.cfg.auto_offset_reset == "earliest" else high

    def pause(self, partitions: set[TopicPartition]) -> None:
        if partitions:
            self.consumer.pause(_theirs(partitions))

    def resume(self, partitions: set[TopicPartition]) -> None:
        if partitions:
            self.consumer.resume(_theirs(partitions))

    def lag(self) -> dict[TopicPartition, int]:
        """From the high watermark of the last fetch (Tansu 0.6 answers ListOffsets(latest) wrongly)."""
        out = {}
        for p in self.consumer.position(self.consumer.assignment()):
            high = self.consumer.get_watermark_offsets(p, cached=True)[1]
            if p.offset >= 0 and high >= 0:
                out[TopicPartition(p.topic, p.partition)] = max(high - p.offset, 0)
        return out

    def close(self) -> None:
        try:
            self.consumer.close()
        finally:
            self.producer.flush(CALL_TIMEOUT_S)  # librdkafka's producer has no close: flush what it can


# A restore reads changelog partitions from their beginning as fast as it can: fetches of up to 16 MiB a
# partition (librdkafka's default is 1 MiB; Tansu 0.6 sends about 5.5 MB a fetch whatever is asked), and
# up to two whole fetches read ahead while the records before them are folded.
RESTORE_FETCH = {"fetch.max.bytes": 64 * 2**20, "max.partition.fetch.bytes": 16 * 2**20,
                 "queued.max.messages.kbytes": 128 * 2**10}


def _records(topic: str, messages: list[Message], headers: Callable[[Message], list[Header] | None]) -> list[Record]:
    """The records among `messages` (the others are events: an end reached, an error)."""
    return [Record(topic, m.partition(), m.offset(), m.timestamp()[1], m.key(), m.value(),  # type: ignore[arg-type]
                   headers(m) or []) for m in messages if m.error() is None]  # a consumed message has them


class ConfluentChangelogReader:
    """ChangelogReader's job on librdkafka: changelog partitions from an offset to their current
    end, several at a time, by a consumer of its own outside the group (assigned, never subscribed)."""

    def __init__(self, cfg: KafkaConfig, topic: str) -> None:
        self.topic = topic
        self.most = cfg.max_poll_records
        self._reading: set[int] = set()
        self._ended: set[int] = set()  # partitions whose end this assignment has reached (an EOF event)
        with _kafka_errors():
            # librdkafka wants a group.id even to assign: this one is never joined and never committed to.
            self.consumer = Consumer(confluent_settings(cfg) | observed(cfg) | RESTORE_FETCH | {
                "client.id": f"{cfg.client_id}-restore", "group.id": f"{cfg.group_id}-restore",
                "enable.auto.commit": False, "enable.partition.eof": True, "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": cfg.fetch_max_wait_ms, "isolation.level": isolation_level(cfg)})
        log.info("restores read %s on librdkafka %s", topic, libversion()[0])

    def start(self, partitions: dict[int, int]) -> None:
        """From the offsets given, and from the log's start if it begins later (auto.offset.reset): for the
        beginning 0, since OFFSET_BEGINNING would first ask for that start, which librdkafka puts off
        500 ms while it knows no leader yet. A partition already being read starts over."""
        self.stop(set(partitions))
        self._reading |= partitions.keys()
        with _kafka_errors():
            self.consumer.incremental_assign([Partition(self.topic, p, offset)
                                              for p, offset in sorted(partitions.items())])

    def log_start(self, partition: int) -> int:
        with _kafka_errors():
            return self.consumer.get_watermark_offsets(Partition(self.topic, partition), timeout=CALL_TIMEOUT_S)[0]

    def stop(self, partitions: set[int]) -> None:
        """Records of these partitions already fetched are dropped with them (librdkafka's op versions)."""
        reading = partitions & self._reading
        self._reading -= reading
        self._ended -= reading
        if reading:
            with _kafka_errors():
                self.consumer.incremental_unassign([Partition(self.topic, p) for p in sorted(reading)])

    def poll(self, timeout_ms: int) -> list[Record]:
        if not self._reading:
            return []
        with _kafka_errors():
            messages = consume_available(self.consumer, self.most, timeout_ms / 1000)
        try:
            records = _records(self.topic, messages, Message.headers)  # type: ignore[arg-type]
        except SystemError:  # a header name that is not UTF-8: this poll again, without such headers
            records = _records(self.topic, messages, _headers)
        if len(records) < len(messages):
            self._events(messages)
        return records

    def _events(self, messages: list[Message]) -> None:
        for m in messages:
            error = m.error()
            if error is None:
                continue
            if error.code() == KafkaError._PARTITION_EOF:
                self._ended.add(m.partition())  # type: ignore[arg-type]  # an EOF event names its partition
            elif error.fatal():
                raise TransportError(str(error))
            # other errors: a partition or broker problem; librdkafka retries by itself

    def caught_up(self) -> set[int]:
        """Partitions read up to the high watermark of the last fetch (Tansu 0.6 answers ListOffsets(latest)
        wrongly). librdkafka keeps that watermark across assignments, so it counts only once this one has
        consumed a record (a position); a partition with none to read counts once its end is reached."""
        done = set(self._ended)
        with _kafka_errors():
            for p in self.consumer.position([Partition(self.topic, p) for p in self._reading - done]):
                high = self.consumer.get_watermark_offsets(p, cached=True)[1]
                if 0 <= high <= p.offset:
                    done.add(p.partition)
        return done

    def close(self) -> None:
        self.consumer.close()
