"""What both back-ends share: the settings they give their clients, and the bookkeeping of a Transport.

The bookkeeping (which offsets are done and which committed, which source partitions the broker
refused, which records still go out) is the same whatever the client; the calls into the client are
each back-end's own (kafka_python.py, confluent.py), as Faust's drivers share a base. Knows nothing of
any client library, of torch or of models.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from ..config import KafkaConfig
from .api import Failure, Header, Offsets, Record, StateRecord, TopicPartition, TransportError

log = logging.getLogger(__name__)

# Batches of 256 KiB: a checkpoint writes many state records at once (16 KiB made 4x more requests).
# Bounded waits (kafka-python's are 60 s to block in send() and 120 s to deliver): a record that cannot
# be delivered fails within 20 s and is redone, so the loop never looks hung to its liveness probe.
# The largest record either producer takes is the same (kafka-python's max_request_size, librdkafka's
# message.max.bytes): a dead letter is cut to it only when the original could never be written whole.
PRODUCER_SETTINGS: dict[str, Any] = {"acks": "all", "linger_ms": 5, "batch_size": 256 * 1024, "max_block_ms": 5000,
                     "request_timeout_ms": 10000, "delivery_timeout_ms": 20000, "max_request_size": 1 << 20}
RECORD_OVERHEAD = 256  # a record batch's header (61 bytes) and one record's framing, with room to spare
NOTE_BYTES = 256  # what a cut dead letter's header and note add (numbers and a few words)
CONSUMER_CALL_TIMEOUT_MS = 5000  # commits and committed-offset lookups while the broker is away

# Our security keys (kafka-python's names) and librdkafka's names for them.
SECURITY_KEYS = {"security_protocol": "security.protocol", "sasl_mechanism": "sasl.mechanism",
                 "sasl_plain_username": "sasl.username", "sasl_plain_password": "sasl.password",
                 "ssl_cafile": "ssl.ca.location", "ssl_certfile": "ssl.certificate.location",
                 "ssl_keyfile": "ssl.key.location", "ssl_password": "ssl.key.password",
                 "ssl_check_hostname": "ssl.endpoint.identification.algorithm"}

DLQ_PREFIX = "streamlstm."
DLQ_REASON = DLQ_PREFIX + "reason"
DLQ_DETAIL = DLQ_PREFIX + "detail"
DLQ_SOURCE = DLQ_PREFIX + "source"
DLQ_TRUNCATED = DLQ_PREFIX + "truncated"

UNREADABLE_INPUT = ("Set kafka.client: confluent, which reads such a record without its unreadable headers, or "
                    "move the group past it (kafka-consumer-groups --reset-offsets --shift-by 1 on the partition "
                    "whose lag stopped falling)")
UNREADABLE_CHANGELOG = ("The changelog is the daemon's own: set state.changelog_topic to a new name (its keys then "
                        "start from zero state)")


# A failed TLS handshake is retried for ever, by every client (its reconnect backoff, then ours), and
# both libraries log each attempt without saying which of our settings to fix: the first failure of each
# kind (for a given CA file) is one warning that does, the rest are dropped (tls_failure).
TLS_HINTS = {
    "certificate verify failed": "check kafka.ssl_cafile ({cafile}): it must hold the CA that signed the broker's "
                                 "certificate (and kafka.ssl_check_hostname, if the certificate names another host)",
    "handshake failed": "check kafka.security_protocol (does {servers} speak TLS?) and the kafka.ssl_* keys",
}
_tls_reported: set[tuple[str, str]] = set()


def tls_failure_kind(message: str) -> str | None:
    """The TLS_HINTS key of a client's log line or error about a failed TLS handshake (kafka-python: "Handshake
    failed: [SSL: ...", librdkafka: "SSL handshake failed: ..." or, now and then, OpenSSL's own "error:...:
    SSL routines::certificate verify failed (after 2ms in state SSL_HANDSHAKE)"), None for anything else."""
    lowered = message.lower()
    if "ssl" not in lowered or ("handshake failed" not in lowered and "state ssl_handshake" not in lowered):
        return None
    return next((kind for kind in TLS_HINTS if kind in lowered), "handshake failed")


def tls_failure(cfg: KafkaConfig, message: str) -> bool:
    """Whether `message` is a failed TLS handshake; the first of its kind is logged as one warning naming
    the setting to check. Called on the clients' threads (a log filter, librdkafka's error callback)."""
    kind = tls_failure_kind(message)
    if kind is None:
        return False
    if (kind, cfg.ssl_cafile) not in _tls_reported:
        _tls_reported.add((kind, cfg.ssl_cafile))
        detail = message[message.lower().index(kind):]
        hint = TLS_HINTS[kind].format(cafile=cfg.ssl_cafile or "unset: the system's CAs", servers=cfg.bootstrap_servers)
        log.warning("kafka TLS: %s (connecting to %s); %s; the clients keep retrying (logged once)", detail,
                    cfg.bootstrap_servers, hint)
    return True


def isolation_level(cfg: KafkaConfig) -> str:
    """Under exactly_once, records of aborted transactions (ours or upstream's) are never read."""
    return "read_committed" if cfg.processing_guarantee == "exactly_once" else "read_uncommitted"


def forwarded(headers: list[Header]) -> list[tuple[str, bytes]]:
    """An input record's headers as they are written again, on either client: a null value (Kafka allows
    one, Java clients write them) goes out empty, since kafka-python's producer refuses null values
    (a TypeError that would stop the daemon at that event every time it is read)."""
    return [(name, b"" if value is None else value) for name, value in headers]


def dead_letter_headers(record: Record, reason: str, detail: str) -> list[tuple[str, bytes]]:
    """The original's headers (a null value empty), then why and where from in headers of ours
    (replacing any from an earlier pass through the dead-letter topic)."""
    return [
        *(header for header in forwarded(record.headers) if not header[0].startswith(DLQ_PREFIX)),
        (DLQ_REASON, reason.encode()),
        (DLQ_DETAIL, detail.encode("utf-8", "replace")),
        (DLQ_SOURCE, f"{record.topic}/{record.partition}/{record.offset}".encode()),
    ]


def _headers_bytes(headers: list[tuple[str, bytes]]) -> int:
    return sum(len(name.encode()) + len(value) + 10 for name, value in headers)  # two varint lengths at most


def dead_letter(record: Record, reason: str, detail: str,
                max_bytes: int) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """The dead letter of `record`: its key, value and headers whole whenever one record of `max_bytes`
    holds them with ours, so it can be fixed and sent again. Otherwise (the producer could never write
    it) the value is cut to fit (and, only if the key alone is too long, the original's headers dropped
    and the key cut); `streamlstm.truncated` then says how long the original value was, and the detail
    what was cut: never shortened silently."""
    key, value = record.key, record.value
    key_bytes, value_bytes = len(key or b""), len(value or b"")
    headers = dead_letter_headers(record, reason, detail)
    if key_bytes + value_bytes + _headers_bytes(headers) + RECORD_OVERHEAD <= max_bytes:
        return key, value, headers
    cut = [f"value of {value_bytes} bytes"]
    if key_bytes + _headers_bytes(headers) + NOTE_BYTES + RECORD_OVERHEAD > max_bytes:
        cut.append(f"{len(record.headers)} original headers dropped, key of {key_bytes} bytes")
        headers = [header for header in headers if header[0].startswith(DLQ_PREFIX)]
    room = max_bytes - RECORD_OVERHEAD - NOTE_BYTES - _headers_bytes(headers)
    key = key and key[:room]
    value = value and value[:room - len(key or b"")]
    note = f"; cut to fit one record of {max_bytes} bytes: {', '.join(cut)}".encode()
    return key, value, [*((name, raw + note if name == DLQ_DETAIL else raw) for name, raw in headers),
                        (DLQ_TRUNCATED, str(value_bytes).encode())]


class Bookkeeping(ABC):
    """A Transport's state that is not the client's: offsets done and committed, partitions failed.

    A back-end provides `_produce` (hand one record to its producer; a refusal, then or later, calls
    `_fail`), `flush`, `commit`, and the consumer calls of the Transport protocol.
    """

    REVOCATION_WAITS = True  # whether a revocation's commit may wait for its answer

    def __init__(self, cfg: KafkaConfig) -> None:
        self.cfg = cfg
        self._done: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._failed: dict[int, Failure] = {}  # by source partition; written on the producer's thread too
        self._state_ends: dict[tuple[str, int], int] = {}  # per changelog partition, the offset after our last acknowledged
        self.copartitioned = False

    @abstractmethod
    def _produce(self, source: int, topic: str, key: bytes | None, value: bytes | None, partition: int | None,
                 headers: list[tuple[str, bytes]] | None, state: bool) -> None:
        """Hand one record to the producer; a refusal later fails `source`, an acknowledged `state` record
        calls `_acked_state`. May raise TransportError."""

    def _acked_state(self, topic: str, partition: int, offset: int) -> None:
        if offset >= self._state_ends.get((topic, partition), 0):
            self._state_ends[topic, partition] = offset + 1

    def state_end(self, topic: str, partition: int) -> int | None:
        """The offset after the last state record of a changelog partition acknowledged (None: none yet)."""
        return self._state_ends.get((topic, partition))

    def _send(self, record: Record, topic: str, value: bytes | None, partition: int | None,
              headers: list[tuple[str, bytes]] | None) -> None:
        """An output of `record` (its key); never raises: a refusal, now or after the producer's retries,
        fails its source partition.

        A failed partition's outputs of records after the failed one are not even sent: it will be redone
        from its last commit. A poll's dead letters go out before its predictions, so the predictions of
        the events before a refused dead letter are still sent.
        """
        source, offset = record.partition, record.offset
        failure = self._failed.get(source)
        if failure is not None and (failure.offset is None or offset > failure.offset):
            return
        try:
            self._produce(source, topic, record.key, value, partition, headers, False)
        except TransportError as exc:
            self._fail(source, topic, exc, offset)

    def _fail(self, source: int, topic: str, error: Exception, offset: int | None = None) -> None:
        """Keep the lowest refused offset (refusals come back out of order); one without an offset fails
        all the partition's work since its last commit, and wins."""
        known = self._failed.get(source)
        if known is None or (known.offset is not None and (offset is None or offset < known.offset)):
            self._failed[source] = Failure(topic, error, offset)

    def _take_failures(self) -> dict[int, Failure]:
        failed, self._failed = self._failed, {}
        return failed

    def send_prediction(self, record: Record, value: bytes, shadow: bool = False) -> None:
        """With the event's headers (trace context, correlation ids), as Kafka Streams forwards them.

        Co-partitioned (as many output partitions as input ones), a prediction goes to its event's
        partition number, beside the key's events and state; otherwise, and on the shadow topic (its
        partitions are not checked), the producer hashes the key.
        """
        partition = record.partition if self.copartitioned and not shadow else None
        self._send(record, self.cfg.shadow_topic if shadow else self.cfg.output_topic, value, partition,
                   forwarded(record.headers) if record.headers else None)

    def send_dead_letter(self, record: Record, reason: str, detail: str) -> None:
        key, value, headers = dead_letter(record, reason, detail, PRODUCER_SETTINGS["max_request_size"])
        self._send(record._replace(key=key), self.cfg.dlq_topic, value, None, headers)

    def send_states(self, topic: str, records: Sequence[StateRecord]) -> None:
        """A checkpoint's thousands at a time, each handed to the producer with nothing else per record;
        a failed partition's are not sent (it will be redone from its last commit)."""
        produce, failed = self._produce, self._failed
        for partition, key, value, headers in records:
            if partition in failed:
                continue
            try:
                produce(partition, topic, key, value, partition, headers, True)
            except TransportError as exc:
                self._fail(partition, topic, exc)

    def mark_done(self, records: list[Record]) -> None:
        """A partition's last record counts."""
        last = {(record.topic, record.partition): record.offset for record in records}
        for (topic, partition), offset in last.items():
            self._done[TopicPartition(topic, partition)] = offset + 1

    def done(self, tp: TopicPartition) -> int | None:
        return self._done.get(tp)

    def pending(self, partitions: set[TopicPartition] | None = None) -> Offsets:
        return {
            tp: offset
            for tp, offset in self._done.items()
            if (partitions is None or tp in partitions) and self._committed.get(tp) != offset
        }

    def _remember(self, offsets: Offsets) -> None:
        self._committed.update(offsets)

    def _commit_failed(self, offsets: Offsets, error: object) -> None:
        """An asynchronous commit that failed: its offsets are pending again, for the next checkpoint."""
        log.warning("asynchronous offset commit failed (%s); retried at the next checkpoint", error)
        for tp, offset in offsets.items():
            if self._committed.get(tp) == offset:
                del self._committed[tp]

    def forget(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            self._done.pop(tp, None)
            self._committed.pop(tp, None)

    @abstractmethod
    def flush(self) -> dict[int, Failure]:
        """Wait for the broker to acknowledge everything sent; return the source partitions it refused."""

    def commit(self, offsets: Offsets, wait: bool = True) -> bool:
        """Commit offsets whose records the broker has acknowledged (flush first, leave out failures);
        whether it did (an asynchronous commit: whether it was handed over).

        A commit that fails is not fatal: the offsets stay pending for the next checkpoint, or, if the
        group has moved the partition, its next owner processes those events again.
        """
        try:
            self._commit(offsets, wait)
        except TransportError as exc:
            log.warning("offset commit failed (%r); retried at the next checkpoint unless the partitions have "
                        "moved, in which case their new owner processes the events since the last commit", exc)
            return False
        self._remember(offsets)
        return True

    @abstractmethod
    def _commit(self, offsets: Offsets, wait: bool) -> None:
        """The client's commit; `wait` False: asynchronous where the client must not block. May raise
        TransportError."""

    def _revoked_scope(self, partitions: set[TopicPartition]) -> set[TopicPartition] | None:
        """Which pending offsets a revocation commits: the revoked partitions' (None: all of them)."""
        return partitions

    def commit_revoked(self, partitions: set[TopicPartition]) -> None:
        """Flush and commit partitions being taken away, before the new owner starts on them.

        Called inside the consumer's poll (kafka-python: on its IO thread, so the commit is asynchronous).
        Failed partitions are not committed; the others' failures are kept for the next checkpoint.
        """
        failed = self.flush()
        self._failed.update({p: f for p, f in failed.items() if TopicPartition(self.cfg.input_topic, p)
                             not in partitions})
        if failed:
            log.warning("not committing revoked partitions %s: the broker refused their records (%r)",
                        sorted(failed), next(iter(failed.values())).error)
        pending = self.pending(self._revoked_scope(partitions))
        self.commit({tp: offset for tp, offset in pending.items() if tp.partition not in failed},
                    wait=self.REVOCATION_WAITS)
        self.forget(partitions)
