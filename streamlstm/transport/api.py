"""What the rest of streamlstm knows of Kafka: the types it speaks and the two interfaces it calls.

The serving code (daemon, checkpointer, restorer) is written against `Transport` and `ChangelogSource`
only; each client library has a back-end that implements them (kafka_python.py, confluent.py) and turns
that library's types and errors into these. A type checker holds both back-ends to the Protocols
(tests/test_architecture.py). Knows nothing of any client library, of torch or of models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

from ..errors import UsageError


class TopicPartition(NamedTuple):
    """A partition of a topic. Equal, as a tuple, to kafka-python's namedtuple of the same name."""

    topic: str
    partition: int


Header = tuple[str, bytes | None]  # Kafka allows a null header value
Offsets = dict[TopicPartition, int]  # the next offset to consume, per partition: what a commit records
StateRecord = tuple[int, bytes, bytes | None, list[tuple[str, bytes]] | None]  # partition, key, value, headers


class Record(NamedTuple):
    """A record as the daemon reads it. The kafka-python back-end passes that client's ConsumerRecord,
    a named tuple with these fields under these names (and more), as it is: no copy per record."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: list[Header]


class Failure(NamedTuple):
    """The first record of a source partition that the broker refused (after the producer's retries):
    the lowest input offset refused, or no offset (the partition's whole work since its last commit)."""

    topic: str
    error: Exception
    offset: int | None = None  # the source record's, when the refusal came as it was sent


class TransportError(Exception):
    """A Kafka call failed in a way that retrying may cure (the broker away, a timeout, a refusal).

    Both back-ends raise this for their client's errors: the daemon backs off and tries again.
    """


class TopicError(UsageError):
    """A topic the daemon needs is missing or shaped wrongly; the message says what to change."""


class UnreadableRecord(UsageError):
    """The client cannot parse a record of a topic it reads; the message says what to do."""


class Rebalance(Protocol):
    """What the owner of per-partition state does when the group moves partitions.

    Called inside poll() or close() (kafka-python: on its IO thread): no blocking consumer calls here.
    """

    def on_revoked(self, partitions: set[TopicPartition]) -> None: ...

    def on_assigned(self, partitions: set[TopicPartition]) -> None: ...

    def on_lost(self, partitions: set[TopicPartition]) -> None: ...


class Transport(Protocol):
    """One consumer in the group plus one producer, and what may be committed: the daemon's Kafka.

    Offsets are committed only after the broker has acknowledged every record produced for them (flush,
    then commit), so a crash can repeat work but never lose an event. A record the broker refuses marks
    its source partition failed: that partition is not committed and must be redone from its last commit.
    Sends never raise; the other calls raise TransportError.
    """

    def poll(self, timeout_ms: int | None = None) -> list[Record]:
        """Records of one poll, partition by partition in offset order."""
        ...

    def send_prediction(self, record: Record, value: bytes, shadow: bool = False) -> None:
        """A prediction for `record`, with its headers (trace context, correlation ids); `shadow`: the shadow
        model's, to kafka.shadow_topic."""
        ...

    def send_dead_letter(self, record: Record, reason: str, detail: str) -> None:
        """`record` as it came, with why and where from in headers of ours."""
        ...

    def send_states(self, topic: str, records: Sequence[StateRecord]) -> None:
        """Changelog records, each into the partition that matches its key's input partition."""
        ...

    def state_end(self, topic: str, partition: int) -> int | None:
        """The offset after the last state record of a changelog partition acknowledged (None: none yet)."""
        ...

    def mark_done(self, records: list[Record]) -> None:
        """Records whose outputs have been sent (not yet acknowledged)."""
        ...

    def done(self, tp: TopicPartition) -> int | None:
        """The next offset to process on a partition, as far as this consumer has got."""
        ...

    def pending(self, partitions: set[TopicPartition] | None = None) -> Offsets:
        """Offsets done and not yet committed (of `partitions`, or all)."""
        ...

    def flush(self) -> dict[int, Failure]:
        """Wait for the broker to acknowledge everything sent; the source partitions it refused."""
        ...

    def commit(self, offsets: Offsets, wait: bool = True) -> bool:
        """Commit offsets whose records the broker has acknowledged; False: it failed, they stay pending."""
        ...

    def commit_revoked(self, partitions: set[TopicPartition]) -> None:
        """Flush and commit partitions being taken away, before their new owner starts on them."""
        ...

    def abort(self) -> None:
        """Drop an open transaction, if any (exactly_once)."""
        ...

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Partitions no longer ours (or rewound): nothing of theirs is committed from here."""
        ...

    def rewind(self, tp: TopicPartition) -> None:
        """Consume a partition again from its committed offset."""
        ...

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Consume a partition from `offset` next; what it has done and committed stays as it is."""
        ...

    def position(self, tp: TopicPartition) -> int | None:
        """Where consumption of a partition resumes; None while the broker does not answer."""
        ...

    def pause(self, partitions: set[TopicPartition]) -> None: ...

    def resume(self, partitions: set[TopicPartition]) -> None: ...

    def lag(self) -> dict[TopicPartition, int]:
        """Records behind the end, per assigned partition whose end is known."""
        ...

    def reopen_producer(self) -> None:
        """Replace a producer that refused records; call only when nothing is in flight."""
        ...

    def close(self) -> None:
        """Leave the group so partitions move on at once, not after a session timeout; a static member
        (kafka.group_instance_id) stays in it for the session timeout, to get its partitions back."""
        ...


class ChangelogSource(Protocol):
    """Changelog partitions read from an offset to their current end, outside the group."""

    def start(self, partitions: dict[int, int]) -> None:
        """Read partitions from the given offsets (0: the beginning; one beyond the end: from the beginning)."""
        ...

    def log_start(self, partition: int) -> int:
        """The first offset the partition still holds (retention may have deleted those before)."""
        ...

    def stop(self, partitions: set[int]) -> None: ...

    def poll(self, timeout_ms: int) -> list[Record]: ...

    def caught_up(self) -> set[int]:
        """Partitions read up to the end the broker last reported."""
        ...

    def close(self) -> None: ...
