"""The daemon's consumer and producer on confluent-kafka (librdkafka), chosen by `kafka.client: confluent`.

Same contract as kafka_io.KafkaIO, whose bookkeeping it inherits (what may be committed, which source
partitions failed); only the calls into the client differ. librdkafka fetches, batches, compresses and
retries in C threads, so the per-record Python work left is one produce() call and one small tuple.
Rebalance callbacks and delivery reports run on the calling thread, inside consume(), poll() and flush().
At-least-once only (config refuses exactly_once with this client). Knows nothing of torch or models.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaException,
    Message,
    Producer,
)
from confluent_kafka import TopicPartition as Partition
from kafka import TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from ..config import KafkaConfig
from .kafka_python import (
    CONSUMER_CALL_TIMEOUT_MS,
    PRODUCER_SETTINGS,
    KafkaIO,
    Rebalance,
    Record,
    isolation_level,
)

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = CONSUMER_CALL_TIMEOUT_MS / 1000
MAX_BLOCK_S = PRODUCER_SETTINGS["max_block_ms"] / 1000  # a full local queue waits this long, as kafka-python's send
UNASSIGNED = -1  # librdkafka's RD_KAFKA_PARTITION_UA: the partitioner picks


def confluent_settings(cfg: KafkaConfig) -> dict[str, object]:
    """The connection and security settings every client gets, in librdkafka's names."""
    settings: dict[str, object] = {"bootstrap.servers": cfg.bootstrap_servers,
                                   "security.protocol": cfg.security_protocol}
    if cfg.security_protocol.startswith("SASL"):
        settings |= {"sasl.mechanism": cfg.sasl_mechanism, "sasl.username": cfg.sasl_plain_username,
                     "sasl.password": cfg.sasl_plain_password}
    if cfg.security_protocol.endswith("SSL"):
        named = {"ssl.ca.location": cfg.ssl_cafile, "ssl.certificate.location": cfg.ssl_certfile,
                 "ssl.key.location": cfg.ssl_keyfile, "ssl.key.password": cfg.ssl_password}
        settings |= {key: value for key, value in named.items() if value}
        settings["ssl.endpoint.identification.algorithm"] = "https" if cfg.ssl_check_hostname else "none"
    return settings


def producer_config(cfg: KafkaConfig) -> dict[str, object]:
    """kafka_io's producer settings in librdkafka's names."""
    settings = PRODUCER_SETTINGS
    return confluent_settings(cfg) | {
        "client.id": f"{cfg.client_id}-producer", "acks": settings["acks"], "enable.idempotence": True,
        "linger.ms": settings["linger_ms"], "batch.size": settings["batch_size"],
        "request.timeout.ms": settings["request_timeout_ms"], "message.timeout.ms": settings["delivery_timeout_ms"],
        "compression.type": cfg.compression_type,
        # murmur2, as the Java clients and kafka-python hash keys (librdkafka's default is CRC32):
        # a key's records land in the same partition whichever client wrote them.
        "partitioner": "murmur2_random"}


def _kafka_error(exc: KafkaException) -> KafkaError:
    """The daemon handles kafka-python's KafkaError (a broker away: back off, retry); so do we."""
    return KafkaError(str(exc.args[0] if exc.args else exc))


@contextmanager
def _kafka_errors() -> Iterator[None]:
    try:
        yield
    except KafkaException as exc:
        raise _kafka_error(exc) from exc


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


def _headers(m: Message) -> list[tuple[str, bytes | None]]:
    """A header name that is not UTF-8 (Kafka allows any bytes; Java clients read it) makes confluent-kafka
    raise SystemError: such a record is read without its headers rather than stopping the daemon."""
    try:
        return m.headers() or []
    except SystemError:
        log.warning("%s/%d/%d: a header name is not UTF-8; the record is read without its headers",
                    m.topic(), m.partition(), m.offset())
        return []


class ConfluentIO(KafkaIO):
    """KafkaIO on confluent-kafka."""

    def __init__(self, cfg: KafkaConfig, rebalance: Rebalance) -> None:
        self._delivered: dict[int, Callable[[object, Message], None]] = {}  # one report callback per source
        super().__init__(cfg, rebalance)

    def _subscribe(self, rebalance: Rebalance) -> Consumer:
        cfg = self.cfg
        with _kafka_errors():
            consumer = Consumer(confluent_settings(cfg) | {
                "client.id": cfg.client_id, "group.id": cfg.group_id, "enable.auto.commit": False,
                "auto.offset.reset": cfg.auto_offset_reset, "session.timeout.ms": cfg.session_timeout_ms,
                "heartbeat.interval.ms": cfg.heartbeat_interval_ms, "fetch.wait.max.ms": cfg.fetch_max_wait_ms,
                "isolation.level": isolation_level(cfg)})

            def assigned(consumer: Consumer, partitions: list[Partition]) -> None:
                consumer.assign(partitions)  # before the callback, which may pause them
                rebalance.on_assigned(_ours(partitions))

            consumer.subscribe([cfg.input_topic], on_assign=assigned,
                               on_revoke=lambda _, partitions: rebalance.on_revoked(_ours(partitions)),
                               on_lost=lambda _, partitions: rebalance.on_lost(_ours(partitions)))
        return consumer

    def _new_producer(self) -> Producer:
        with _kafka_errors():
            return Producer(producer_config(self.cfg))

    def _partitions(self, topic: str) -> set[int]:
        with _kafka_errors():
            metadata = self.producer.list_topics(topic, timeout=CALL_TIMEOUT_S).topics[topic]
        if metadata.error is not None:
            raise KafkaError(str(metadata.error))
        return set(metadata.partitions)

    def _close_producer(self, timeout_s: float | None = None) -> None:
        """librdkafka's producer has no close: flush what it can, then let it go."""
        self.producer.flush(CALL_TIMEOUT_S if timeout_s is None else timeout_s)

    def poll(self, timeout_ms: int | None = None) -> list[Record]:
        """Also serves the producer's delivery reports, which is where refusals are noticed."""
        timeout = self.cfg.poll_timeout_ms if timeout_ms is None else timeout_ms
        self.producer.poll(0)
        with _kafka_errors():
            messages = consume_available(self.consumer, self.cfg.max_poll_records, timeout / 1000)
        records = []
        for m in messages:
            if m.error() is not None:  # a partition or broker problem; librdkafka retries by itself
                if m.error().fatal():
                    raise KafkaError(str(m.error()))
                continue
            records.append(Record(m.topic(), m.partition(), m.offset(), m.timestamp()[1], m.key(), m.value(),
                                  _headers(m)))
        return records

    def _produce(self, source: int, topic: str, key: bytes | None, value: bytes | None, partition: int | None,
                 headers: list[tuple[str, bytes]] | None) -> None:
        on_delivery = self._delivered.get(source) or self._delivered.setdefault(source, partial(self._report, source))
        partition = UNASSIGNED if partition is None else partition
        deadline = None
        while True:  # once per record: plain try/except, no context manager
            try:
                self.producer.produce(topic, value, key, partition, on_delivery=on_delivery, headers=headers)
                return
            except BufferError:  # the local queue is full: wait for deliveries to make room
                deadline = deadline or time.monotonic() + MAX_BLOCK_S
                if time.monotonic() > deadline:
                    raise KafkaError(f"producer queue still full after {MAX_BLOCK_S:.0f} s") from None
                self.producer.poll(0.05)
            except KafkaException as exc:
                raise _kafka_error(exc) from exc

    def _report(self, source: int, error: object, message: Message) -> None:
        if error is not None:
            self._fail(source, message.topic(), KafkaError(str(error)))

    def _flush_producer(self) -> None:
        self.producer.flush()

    def _commit_offsets(self, offsets: dict[TopicPartition, OffsetAndMetadata], wait: bool) -> None:
        """Always synchronous: rebalance callbacks run on our thread, so a revoked partition's commit can
        land before its next owner reads it."""
        with _kafka_errors():
            self.consumer.commit(offsets=_theirs(offsets, lambda tp: offsets[tp].offset), asynchronous=False)

    def rewind(self, tp: TopicPartition) -> None:
        committed = self._committed_offset(tp)
        if committed is None:
            committed = OFFSET_BEGINNING if self.cfg.auto_offset_reset == "earliest" else OFFSET_END
        with _kafka_errors():
            self.consumer.seek(Partition(tp.topic, tp.partition, committed))
        self.forget({tp})

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
        except KafkaError:
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
        """Leave the group so partitions move on at once, not after a session timeout."""
        try:
            self.consumer.close()
        finally:
            self._close_producer()
