"""Which Kafka transaction features work on the embedded Tansu broker with kafka-python 3?

Starts its own EmbeddedBroker (Tansu, memory storage, 127.0.0.1 only) and runs, in order:

  1. init_transactions() on a transactional producer
  2. begin / send 10 / commit; a read_committed consumer sees exactly those 10
  3. (a) begin / send 10 / abort; read_committed must skip them (read_uncommitted is reported);
     (b) control: the same read with the aborted_transactions a Kafka broker would send
     filled into the fetch response, to tell a broker gap from a client bug
  4. an open transaction is invisible to read_committed until it commits
  5. send_offsets_to_transaction(): the group's offset lands on commit (a) and not on abort (b);
     (c) the same with KafkaConsumer.group_metadata() instead of a group_id str
  6. fencing: a second producer with the same transactional_id calls init_transactions();
     the first one's send/commit must fail, with an open transaction (a) or idle (b);
     (c) the fenced producer's records stay hidden from read_committed
  7. crash: a producer SIGKILLed mid-transaction; (a) the successor's init_transactions()
     ends the dangling transaction and read_committed moves past it, (b) its records stay
     hidden, (c) with no successor, does transaction_timeout_ms expire it?
  8. (a) high watermark and last stable offset in fetch responses and consumer.highwater();
     (b) consumer.end_offsets() (ListOffsets LATEST) against them

Each check prints one line "PASS|FAIL <check>: <detail>" and the run continues after a failure;
every check runs under a time limit (20 s, 22 s for 7c) so a hang becomes a FAIL. The whole run
takes about 30 s; the process exit code is always 0 (the lines are the result).

Run from the repository root:

    python benchmarks/tansu_transactions.py            # kafka-python logging silenced
    python benchmarks/tansu_transactions.py --debug    # kafka-python warnings on stderr

To report what the broker actually sent (last_stable_offset, aborted_transactions, the
ABORT/COMMIT control batches) the readers wrap a private method of kafka-python's Fetcher; the
client does not expose these. That is for measurement only; the records a check counts are
the ones KafkaConsumer.poll() returns.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.record import MemoryRecords
from kafka.structs import ConsumerGroupMetadata, MemberState, OffsetAndMetadata

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streamlstm.demo.broker import EmbeddedBroker  # noqa: E402

CHECK_TIMEOUT_S = 20.0
IDLE_S = 1.5           # a read stops once the position has not moved for this long
MAX_READ_S = 6.0       # ... or after this long in any case
GROUP_TIMEOUTS = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}
TIMEOUT_WAIT_S = 14.0   # check 7c: Kafka aborts within transaction_timeout_ms + 10 s (cleanup interval)
RUN_ID = uuid.uuid4().hex[:6]


class CheckFailed(Exception):
    """A check's expectation did not hold; the message is the detail."""


# --------------------------------------------------------------------------- clients

def txn_producer(bootstrap: str, txn_id: str, transaction_timeout_ms: int = 60_000) -> KafkaProducer:
    """A transactional producer with short blocking limits, so failures surface quickly."""
    return KafkaProducer(
        bootstrap_servers=bootstrap,
        client_id=f"txn-{txn_id}",
        transactional_id=txn_id,          # implies enable_idempotence=True, acks='all'
        max_block_ms=10_000,              # bounds init_transactions() and send() blocking; commit,
                                          # abort and send_offsets_to_transaction wait unbounded
        request_timeout_ms=10_000,
        delivery_timeout_ms=15_000,
        linger_ms=0,
        transaction_timeout_ms=transaction_timeout_ms,
    )


def close_quietly(client: KafkaProducer | KafkaConsumer | KafkaAdminClient | None) -> None:
    if client is None:
        return
    try:
        if isinstance(client, KafkaProducer):
            client.close(timeout=2)
        else:
            client.close()
    except Exception:  # noqa: BLE001 - cleanup must never mask the check's own result
        pass


def create_topics(bootstrap: str, names: list[str]) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="txn-admin")
    try:
        admin.create_topics({n: {"num_partitions": 1, "replication_factor": 1} for n in names},
                            wait_for_metadata=True)
    finally:
        admin.close()


def send_values(producer: KafkaProducer, topic: str, vals: list[str]) -> None:
    """Send and wait for every ack, so the records are on the broker before we go on."""
    futures = [producer.send(topic, value=v.encode(), partition=0) for v in vals]
    producer.flush(timeout=10)
    for f in futures:
        f.get(timeout=10)


def values(prefix: str, n: int = 10) -> list[str]:
    """Record values are "<prefix>-<i>"; the prefix says which check (and which step) wrote them."""
    return [f"{prefix}-{i}" for i in range(n)]


# --------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class Batch:
    base: int
    last: int
    producer_id: int
    epoch: int
    marker: str | None              # "ABORT" / "COMMIT" for a control batch, else None


@dataclass
class ReadResult:
    isolation: str
    records: list[tuple[int, str]] = field(default_factory=list)   # (offset, value) returned by poll()
    position: int | None = None     # where the consumer stopped
    end_offset: int | None = None   # consumer.end_offsets(): ListOffsets(LATEST) at this isolation level
    highwater: int | None = None    # consumer.highwater(tp) after the read
    fetch_hw: int | None = None     # high_watermark in the last fetch response
    fetch_lso: int | None = None    # last_stable_offset in the last fetch response
    fetch_version: int | None = None
    aborted_txns: int = 0           # aborted_transactions entries seen in fetch responses
    injected: int = 0               # entries filled in by inject_aborted (control experiment)
    batches: dict[int, Batch] = field(default_factory=dict)          # raw batches seen, by base offset
    stalled: bool = False           # gave up before reaching the fetch response's LSO/HW

    @property
    def values(self) -> list[str]:
        return [v for _, v in self.records]

    def having(self, prefix: str) -> list[str]:
        return [v for v in self.values if v.startswith(prefix + "-")]

    def bound(self) -> int | None:
        """How far this consumer may read: the LSO for read_committed, the HW otherwise."""
        return self.fetch_lso if self.isolation == "read_committed" else self.fetch_hw

    def offsets(self) -> str:
        return (f"position={self.position} fetch_hw={self.fetch_hw} fetch_lso={self.fetch_lso} "
                f"highwater()={self.highwater} end_offsets()={self.end_offset}")

    def marker_after(self, prefix: str) -> str:
        """The control marker that ended the transaction holding the first record with this prefix."""
        first = next((o for o, v in self.records if v.startswith(prefix + "-")), None)
        if first is None:
            return "records not returned"
        batch = next((b for b in self.batches.values() if b.base <= first <= b.last), None)
        if batch is None:
            return "batch not seen"
        marker = next((b for b in sorted(self.batches.values(), key=lambda b: b.base)
                       if b.marker and b.producer_id == batch.producer_id and b.base > first), None)
        if marker is None:
            return f"no marker for producer_id={batch.producer_id}"
        return f"{marker.marker} marker@{marker.base} (producer_id={marker.producer_id} epoch={marker.epoch})"


def _batches(raw: bytes | None) -> list[Batch]:
    out: list[Batch] = []
    if not raw:
        return out
    records = MemoryRecords(raw)
    while (batch := records.next_batch()) is not None:
        marker = None
        if batch.is_control_batch:
            marker = "ABORT" if next(batch).abort else "COMMIT"
        out.append(Batch(batch.base_offset, batch.last_offset, batch.producer_id, batch.producer_epoch,
                         marker))
    return out


def _aborted_from_markers(data: Any, batches: list[Batch]) -> list[Any]:
    """What a Kafka broker would put in aborted_transactions: (producer_id, first_offset) for each
    transaction in this response that ends in an ABORT marker."""
    entries = []
    for marker in (b for b in batches if b.marker == "ABORT"):
        firsts = [b.base for b in batches
                  if b.producer_id == marker.producer_id and not b.marker and b.base < marker.base]
        if firsts:
            entries.append(type(data).AbortedTransaction(producer_id=marker.producer_id,
                                                         first_offset=min(firsts)))
    return entries


def _spy_on_fetches(consumer: KafkaConsumer, result: ReadResult, inject_aborted: bool) -> None:
    """Record HW, LSO, aborted transactions and raw batches of every fetch response.

    kafka-python keeps none of these except the HW, so this wraps Fetcher._parse_fetched_data.
    With inject_aborted, an empty aborted_transactions list is filled in from the ABORT markers
    (the control experiment for check 3b).
    """
    fetcher = consumer._fetcher
    original = fetcher._parse_fetched_data

    def parse(completed_fetch):  # type: ignore[no-untyped-def]
        data = completed_fetch.partition_data
        batches = _batches(data.records)
        result.fetch_version = completed_fetch.response_version
        result.fetch_hw = data.high_watermark
        result.fetch_lso = getattr(data, "last_stable_offset", None)
        result.aborted_txns += len(getattr(data, "aborted_transactions", None) or [])
        if inject_aborted and not data.aborted_transactions:
            data.aborted_transactions = _aborted_from_markers(data, batches)
            result.injected += len(data.aborted_transactions)
        result.batches.update((b.base, b) for b in batches)
        return original(completed_fetch)

    fetcher._parse_fetched_data = parse


def read_topic(bootstrap: str, topic: str, isolation: str, inject_aborted: bool = False) -> ReadResult:
    """Read partition 0 from the beginning until the position reaches the broker's LSO (read_committed)
    or HW (read_uncommitted) as reported in the fetch response, or stops moving."""
    tp = TopicPartition(topic, 0)
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, client_id=f"reader-{isolation}", group_id=None,
        enable_auto_commit=False, isolation_level=isolation, fetch_max_wait_ms=200,
        request_timeout_ms=10_000,
    )
    result = ReadResult(isolation=isolation)
    try:
        _spy_on_fetches(consumer, result, inject_aborted)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        result.end_offset = consumer.end_offsets([tp], timeout_ms=5_000)[tp]
        start = last_move = time.monotonic()
        last_position = -1
        while True:
            for records in consumer.poll(timeout_ms=200).values():
                result.records.extend((r.offset, r.value.decode()) for r in records)
            position = consumer.position(tp, timeout_ms=5_000)
            now = time.monotonic()
            if position != last_position:
                last_position, last_move = position, now
            bound = result.bound()
            if bound is not None and position >= bound:
                break
            if now - last_move > IDLE_S or now - start > MAX_READ_S:
                result.stalled = True
                break
        result.position = last_position
        result.highwater = consumer.highwater(tp)
        return result
    finally:
        close_quietly(consumer)


def committed_offset(bootstrap: str, group_id: str, tp: TopicPartition) -> int | None:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False,
                             request_timeout_ms=10_000, **GROUP_TIMEOUTS)
    try:
        return consumer.committed(tp, timeout_ms=5_000)
    finally:
        close_quietly(consumer)


# --------------------------------------------------------------------------- harness

@dataclass
class Context:
    bootstrap: str
    topic_a: str = f"txn-a-{RUN_ID}"
    topic_open: str = f"txn-open-{RUN_ID}"
    topic_offsets_out: str = f"txn-offsets-out-{RUN_ID}"
    topic_offsets_in: str = f"txn-offsets-in-{RUN_ID}"
    topic_fence: str = f"txn-fence-{RUN_ID}"
    topic_crash: str = f"txn-crash-{RUN_ID}"
    topic_crash_timeout: str = f"txn-crash-timeout-{RUN_ID}"
    topic_lso: str = f"txn-lso-{RUN_ID}"
    results: list[tuple[str, bool]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)   # observations shared by related checks

    def topics(self) -> list[str]:
        return [self.topic_a, self.topic_open, self.topic_offsets_out, self.topic_offsets_in,
                self.topic_fence, self.topic_crash, self.topic_crash_timeout, self.topic_lso]


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def run_check(ctx: Context, name: str, fn: Callable[[Context], str],
              timeout_s: float = CHECK_TIMEOUT_S) -> bool:
    """Run fn in a daemon thread; fn returns a PASS detail or raises (CheckFailed or anything)."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["detail"] = fn(ctx)
        except CheckFailed as exc:
            outcome["fail"] = str(exc)
        except BaseException as exc:  # noqa: BLE001 - report every error as a FAIL
            outcome["fail"] = describe(exc)

    thread = threading.Thread(target=target, name=name, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(timeout_s)
    took = time.monotonic() - started
    if thread.is_alive():
        ok, detail = False, f"timed out after {timeout_s:.0f} s (a blocking call never returned)"
    elif "fail" in outcome:
        ok, detail = False, str(outcome["fail"])
    else:
        ok, detail = True, str(outcome["detail"])
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail} [{took:.1f}s]", flush=True)
    ctx.results.append((name, ok))
    return ok


def expect(condition: bool, detail: str) -> None:
    if not condition:
        raise CheckFailed(detail)


# --------------------------------------------------------------------------- checks

FENCING_ERRORS = ("ProducerFencedError", "InvalidProducerEpochError")


def _commit_values(ctx: Context, txn_id: str, topic: str, vals: list[str]) -> None:
    producer = txn_producer(ctx.bootstrap, txn_id)
    try:
        producer.init_transactions()
        producer.begin_transaction()
        send_values(producer, topic, vals)
        producer.commit_transaction()
    finally:
        close_quietly(producer)


def check_init(ctx: Context) -> str:
    producer = txn_producer(ctx.bootstrap, f"t1-{RUN_ID}")
    try:
        producer.init_transactions()
        pid = producer._transaction_manager.producer_id_and_epoch   # private; for the report only
        return (f"init_transactions() returned: producer_id={pid.producer_id} epoch={pid.epoch}")
    finally:
        close_quietly(producer)


def check_commit(ctx: Context) -> str:
    _commit_values(ctx, f"t2-{RUN_ID}", ctx.topic_a, values("c2"))
    read = read_topic(ctx.bootstrap, ctx.topic_a, "read_committed")
    expect(sorted(read.values) == sorted(values("c2")),
           f"read_committed saw {len(read.values)} records {read.values[:12]} ({read.offsets()})")
    return f"read_committed saw exactly the 10 committed records ({read.offsets()})"


def check_abort(ctx: Context) -> str:
    producer = txn_producer(ctx.bootstrap, f"t3-{RUN_ID}")
    try:
        producer.init_transactions()
        producer.begin_transaction()
        send_values(producer, ctx.topic_a, values("c3abort"))
        producer.abort_transaction()
        producer.begin_transaction()
        send_values(producer, ctx.topic_a, values("c3after"))
        producer.commit_transaction()
    finally:
        close_quietly(producer)
    rc = read_topic(ctx.bootstrap, ctx.topic_a, "read_committed")
    ru = read_topic(ctx.bootstrap, ctx.topic_a, "read_uncommitted")
    detail = (f"abort_transaction() returned and wrote {ru.marker_after('c3abort')}; "
              f"read_committed sees c2={len(rc.having('c2'))} aborted={len(rc.having('c3abort'))} "
              f"after={len(rc.having('c3after'))}, read_uncommitted sees c2={len(ru.having('c2'))} "
              f"aborted={len(ru.having('c3abort'))} after={len(ru.having('c3after'))}; "
              f"FetchResponse v{rc.fetch_version} carried {rc.aborted_txns} aborted_transactions entries; "
              f"{rc.offsets()}")
    expect(not rc.having("c3abort") and len(rc.having("c2")) == 10 and len(rc.having("c3after")) == 10,
           detail)
    return detail


def check_abort_control(ctx: Context) -> str:
    """Control for 3a: same log, but give kafka-python the aborted_transactions a Kafka broker sends."""
    rc = read_topic(ctx.bootstrap, ctx.topic_a, "read_committed", inject_aborted=True)
    detail = (f"with {rc.injected} aborted_transactions entries filled in from the ABORT markers, "
              f"read_committed sees c2={len(rc.having('c2'))} aborted={len(rc.having('c3abort'))} "
              f"after={len(rc.having('c3after'))}")
    expect(rc.injected > 0 and not rc.having("c3abort") and len(rc.values) == 20, detail)
    return detail + " -> kafka-python filters correctly; 3a fails on the broker's fetch response"


def check_open_invisible(ctx: Context) -> str:
    producer = txn_producer(ctx.bootstrap, f"t4-{RUN_ID}")
    try:
        producer.init_transactions()
        producer.begin_transaction()
        send_values(producer, ctx.topic_open, values("c4"))
        before = read_topic(ctx.bootstrap, ctx.topic_open, "read_committed")
        before_ru = read_topic(ctx.bootstrap, ctx.topic_open, "read_uncommitted")
        producer.commit_transaction()
    finally:
        close_quietly(producer)
    after = read_topic(ctx.bootstrap, ctx.topic_open, "read_committed")
    detail = (f"before commit read_committed sees {len(before.values)} ({before.offsets()}), "
              f"read_uncommitted sees {len(before_ru.values)}; after commit read_committed sees "
              f"{len(after.values)} ({after.offsets()})")
    expect(not before.values and sorted(after.values) == sorted(values("c4")), detail)
    return detail


def _txn_with_offsets(ctx: Context, txn_id: str, group: str | ConsumerGroupMetadata,
                      offset: int, commit: bool) -> None:
    tp_in = TopicPartition(ctx.topic_offsets_in, 0)
    producer = txn_producer(ctx.bootstrap, txn_id)
    try:
        producer.init_transactions()
        producer.begin_transaction()
        send_values(producer, ctx.topic_offsets_out, [f"c5-{txn_id}-{offset}"])
        producer.send_offsets_to_transaction({tp_in: OffsetAndMetadata(offset, "", -1)}, group)
        if commit:
            producer.commit_transaction()
        else:
            producer.abort_transaction()
    finally:
        close_quietly(producer)


def check_offsets_commit(ctx: Context) -> str:
    group = f"g5-{RUN_ID}"
    tp_in = TopicPartition(ctx.topic_offsets_in, 0)
    _txn_with_offsets(ctx, f"t5-{RUN_ID}", group, 5, commit=True)
    got = committed_offset(ctx.bootstrap, group, tp_in)
    expect(got == 5, f"after commit with offset 5 the group's committed offset is {got!r}")
    return (f"send_offsets_to_transaction({{tp: OffsetAndMetadata(5, '', -1)}}, '{group}') + commit "
            f"-> committed(tp)={got}")


def check_offsets_abort(ctx: Context) -> str:
    group = f"g5-{RUN_ID}"
    tp_in = TopicPartition(ctx.topic_offsets_in, 0)
    before = committed_offset(ctx.bootstrap, group, tp_in)
    _txn_with_offsets(ctx, f"t5-{RUN_ID}", group, 8, commit=False)
    got = committed_offset(ctx.bootstrap, group, tp_in)
    expect(got == before,
           f"offset 8 sent in an aborted transaction; committed(tp) went {before!r} -> {got!r}")
    return f"offset 8 sent then abort -> committed(tp) stays {got!r}"


def check_offsets_group_metadata(ctx: Context) -> str:
    """The KIP-447 form: pass the live consumer's ConsumerGroupMetadata (generation + member id)."""
    group = f"g5m-{RUN_ID}"
    tp_in = TopicPartition(ctx.topic_offsets_in, 0)
    consumer = KafkaConsumer(ctx.topic_offsets_in, bootstrap_servers=ctx.bootstrap, group_id=group,
                             enable_auto_commit=False, request_timeout_ms=10_000, **GROUP_TIMEOUTS)
    try:
        deadline = time.monotonic() + 12
        while consumer.group_metadata().state != MemberState.STABLE and time.monotonic() < deadline:
            consumer.poll(timeout_ms=200)
        meta = consumer.group_metadata()
        expect(meta.state == MemberState.STABLE, f"consumer did not join group {group}: {meta}")
        _txn_with_offsets(ctx, f"t5m-{RUN_ID}", meta, 3, commit=True)
        got = consumer.committed(tp_in, timeout_ms=5_000)
        expect(got == 3, f"with {meta} the group's committed offset is {got!r}, expected 3")
        return (f"send_offsets_to_transaction(offsets, consumer.group_metadata()) with generation_id="
                f"{meta.generation_id} + commit -> committed(tp)={got}")
    finally:
        close_quietly(consumer)


def _send_and_commit(producer: KafkaProducer, topic: str, vals: list[str], begin: bool) -> str:
    """Try to finish a transaction; return the error as 'Class: message', or '' on success."""
    try:
        if begin:
            producer.begin_transaction()
        send_values(producer, topic, vals)
        producer.commit_transaction()
    except Exception as exc:  # noqa: BLE001 - the error *is* the result
        return describe(exc)
    return ""


def check_fencing_open(ctx: Context) -> str:
    """First producer has an open transaction when the second one calls init_transactions()."""
    txn_id = f"t6-{RUN_ID}"
    first, second = txn_producer(ctx.bootstrap, txn_id), None
    try:
        first.init_transactions()
        first.begin_transaction()
        send_values(first, ctx.topic_fence, values("c6first"))
        second = txn_producer(ctx.bootstrap, txn_id)
        second.init_transactions()       # should bump the epoch and abort first's open transaction
        error = _send_and_commit(first, ctx.topic_fence, values("c6late", 1), begin=False)
        second.begin_transaction()
        send_values(second, ctx.topic_fence, values("c6second"))
        second.commit_transaction()
    finally:
        close_quietly(first)
        close_quietly(second)
    ru = read_topic(ctx.bootstrap, ctx.topic_fence, "read_uncommitted")
    ctx.notes["fence"] = ru
    detail = (f"first's send+commit after second's init_transactions raised {error or 'NOTHING'}; "
              f"second's init_transactions wrote {ru.marker_after('c6first')} for first's open transaction; "
              f"second committed ({ru.marker_after('c6second')})")
    expect(error.startswith(FENCING_ERRORS), detail)
    return detail


def check_fencing_idle(ctx: Context) -> str:
    """First producer is idle (initialised, no transaction) when the second one initialises."""
    txn_id = f"t6idle-{RUN_ID}"
    first, second = txn_producer(ctx.bootstrap, txn_id), txn_producer(ctx.bootstrap, txn_id)
    try:
        first.init_transactions()
        second.init_transactions()
        error = _send_and_commit(first, ctx.topic_fence, values("c6idle", 1), begin=True)
    finally:
        close_quietly(first)
        close_quietly(second)
    detail = f"first's begin+send+commit after second's init_transactions raised {error or 'NOTHING'}"
    expect(error.startswith(FENCING_ERRORS), detail)
    return detail


def check_fencing_visibility(ctx: Context) -> str:
    expect("fence" in ctx.notes, "check 6a did not get far enough to produce anything")
    rc = read_topic(ctx.bootstrap, ctx.topic_fence, "read_committed")
    detail = (f"read_committed sees fenced first={len(rc.having('c6first'))} late={len(rc.having('c6late'))} "
              f"idle={len(rc.having('c6idle'))} second={len(rc.having('c6second'))} "
              f"(aborted_transactions entries in fetch: {rc.aborted_txns})")
    expect(not rc.having("c6first") and not rc.having("c6late") and not rc.having("c6idle")
           and len(rc.having("c6second")) == 10, detail)
    return detail


def crash_child(bootstrap: str, topic: str, txn_id: str, timeout_ms: int) -> None:
    """Subprocess body for check 7: open a transaction, send, announce, then wait to be killed."""
    producer = txn_producer(bootstrap, txn_id, transaction_timeout_ms=timeout_ms)
    producer.init_transactions()
    producer.begin_transaction()
    send_values(producer, topic, values("c7killed"))
    print("READY", flush=True)
    time.sleep(600)


def _spawn_and_kill(ctx: Context, topic: str, txn_id: str, timeout_ms: int = 60_000) -> None:
    child = subprocess.Popen(
        [sys.executable, __file__, "--crash-child", ctx.bootstrap, topic, txn_id, str(timeout_ms)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = child.stdout.readline().strip() if child.stdout else ""
        expect(line == "READY", f"crash child did not open its transaction (said {line!r}, "
                                f"exit code {child.poll()})")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()


def _crash_counts(r: ReadResult) -> str:
    return (f"before={len(r.having('c7before'))} killed={len(r.having('c7killed'))} "
            f"behind={len(r.having('c7behind'))} after={len(r.having('c7after'))} [{r.offsets()}]")


def check_crash_recovery(ctx: Context) -> str:
    """A SIGKILLed producer's transaction blocks the LSO until its successor's init_transactions()."""
    txn_id = f"t7-{RUN_ID}"
    _commit_values(ctx, f"t7other-{RUN_ID}", ctx.topic_crash, values("c7before", 5))
    _spawn_and_kill(ctx, ctx.topic_crash, txn_id)
    _commit_values(ctx, f"t7other-{RUN_ID}", ctx.topic_crash, values("c7behind", 5))
    dangling = read_topic(ctx.bootstrap, ctx.topic_crash, "read_committed")
    successor = txn_producer(ctx.bootstrap, txn_id)
    try:
        successor.init_transactions()           # should abort the killed producer's transaction
        successor.begin_transaction()
        send_values(successor, ctx.topic_crash, values("c7after", 5))
        successor.commit_transaction()
    finally:
        close_quietly(successor)
    recovered = read_topic(ctx.bootstrap, ctx.topic_crash, "read_committed")
    ru = read_topic(ctx.bootstrap, ctx.topic_crash, "read_uncommitted")
    ctx.notes["crash"] = recovered
    blocked = (dangling.position is not None and dangling.fetch_hw is not None
               and dangling.position < dangling.fetch_hw)
    reached_end = not recovered.stalled and recovered.position == recovered.fetch_hw
    detail = (f"while the killed txn dangles read_committed stops at the LSO: {_crash_counts(dangling)}; "
              f"successor init_transactions wrote {ru.marker_after('c7killed')}; then read_committed: "
              f"{_crash_counts(recovered)} reached_end={reached_end}")
    expect(blocked and reached_end and len(recovered.having("c7behind")) == 5
           and len(recovered.having("c7after")) == 5, detail)
    return detail


def check_crash_visibility(ctx: Context) -> str:
    expect("crash" in ctx.notes, "check 7a did not get far enough to read anything")
    rc: ReadResult = ctx.notes["crash"]
    detail = (f"after the successor aborted it, read_committed still returns killed="
              f"{len(rc.having('c7killed'))} of the killed producer's 10 records "
              f"(aborted_transactions entries in fetch: {rc.aborted_txns})")
    expect(not rc.having("c7killed"), detail)
    return "read_committed returns none of the killed producer's records"


def check_crash_timeout(ctx: Context) -> str:
    """No successor: does the broker abort the dangling transaction after transaction_timeout_ms?"""
    timeout_ms = 2_000
    _spawn_and_kill(ctx, ctx.topic_crash_timeout, f"t7timeout-{RUN_ID}", timeout_ms)
    killed_at = time.monotonic()
    _commit_values(ctx, f"t7timeout-other-{RUN_ID}", ctx.topic_crash_timeout, values("c7behind", 5))
    while True:
        rc = read_topic(ctx.bootstrap, ctx.topic_crash_timeout, "read_committed")
        waited = time.monotonic() - killed_at
        if rc.position == rc.fetch_hw or waited > TIMEOUT_WAIT_S:
            break
    detail = (f"transaction_timeout_ms={timeout_ms}, {waited:.0f} s after SIGKILL with no successor: "
              f"read_committed {_crash_counts(rc)}")
    expect(rc.position == rc.fetch_hw, detail + " -> LSO still stuck at the dangling transaction")
    return detail + " -> broker expired the transaction"


def check_lso_fetch(ctx: Context) -> str:
    """HW vs LSO in fetch responses: 5 committed, then an open transaction of 5; commit; measure again."""
    _commit_values(ctx, f"t8a-{RUN_ID}", ctx.topic_lso, values("c8done", 5))
    producer = txn_producer(ctx.bootstrap, f"t8b-{RUN_ID}")
    try:
        producer.init_transactions()
        producer.begin_transaction()
        send_values(producer, ctx.topic_lso, values("c8open", 5))
        reads = {"open": (read_topic(ctx.bootstrap, ctx.topic_lso, "read_committed"),
                          read_topic(ctx.bootstrap, ctx.topic_lso, "read_uncommitted"))}
        producer.commit_transaction()
    finally:
        close_quietly(producer)
    reads["committed"] = (read_topic(ctx.bootstrap, ctx.topic_lso, "read_committed"),
                          read_topic(ctx.bootstrap, ctx.topic_lso, "read_uncommitted"))
    ctx.notes["lso"] = reads
    (rc_open, ru_open), (rc_done, ru_done) = reads["open"], reads["committed"]

    def m(r: ReadResult) -> str:
        return (f"hw={r.fetch_hw} lso={r.fetch_lso} highwater()={r.highwater} position={r.position} "
                f"records={len(r.values)}")

    detail = (f"open txn: read_committed[{m(rc_open)}] read_uncommitted[{m(ru_open)}]; "
              f"after commit: read_committed[{m(rc_done)}] read_uncommitted[{m(ru_done)}]")
    lso_lags = (rc_open.fetch_lso is not None and rc_open.fetch_hw is not None
                and rc_open.fetch_lso < rc_open.fetch_hw)
    ok = (lso_lags and rc_open.position == rc_open.fetch_lso and ru_open.position == ru_open.fetch_hw
          and rc_done.fetch_lso == rc_done.fetch_hw == rc_done.position)
    expect(ok, detail)
    return detail


def check_lso_list_offsets(ctx: Context) -> str:
    """consumer.end_offsets() (ListOffsets LATEST) should equal the LSO (read_committed) or HW."""
    expect("lso" in ctx.notes, "check 8a did not get far enough to measure anything")
    parts, ok = [], True
    for state, pair in ctx.notes["lso"].items():
        for r in pair:
            want = r.bound()
            ok &= r.end_offset == want
            parts.append(f"{state} {r.isolation}: end_offsets()={r.end_offset} expected={want}")
    batches = sorted(ctx.notes["lso"]["committed"][1].batches.values(), key=lambda b: b.base)
    layout = " ".join(f"[{b.base}..{b.last}{' ' + b.marker if b.marker else ''}]" for b in batches)
    detail = "; ".join(parts) + f"; batches on the log: {layout}"
    expect(ok, detail)
    return detail


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[Context], str]
    timeout_s: float = CHECK_TIMEOUT_S


CHECKS: list[Check] = [
    Check("1 init_transactions", check_init),
    Check("2 commit visible to read_committed", check_commit),
    Check("3a abort hidden from read_committed", check_abort),
    Check("3b control: client filter given Kafka-style aborted_transactions", check_abort_control),
    Check("4 open txn invisible to read_committed until commit", check_open_invisible),
    Check("5a send_offsets_to_transaction(offsets, group_id) + commit", check_offsets_commit),
    Check("5b send_offsets_to_transaction + abort leaves offset alone", check_offsets_abort),
    Check("5c send_offsets_to_transaction(offsets, group_metadata()) + commit", check_offsets_group_metadata),
    Check("6a fencing: same transactional_id re-init fences an open txn", check_fencing_open),
    Check("6b fencing: same transactional_id re-init fences an idle producer", check_fencing_idle),
    Check("6c fencing: fenced producer's records hidden from read_committed", check_fencing_visibility),
    Check("7a SIGKILLed producer: successor's init ends it, LSO advances", check_crash_recovery),
    Check("7b SIGKILLed producer: its records hidden from read_committed", check_crash_visibility),
    Check("7c SIGKILLed producer, no successor: transaction_timeout_ms expiry", check_crash_timeout,
          TIMEOUT_WAIT_S + 8),
    Check("8a fetch high watermark and last stable offset", check_lso_fetch),
    Check("8b end_offsets() (ListOffsets) returns HW / LSO", check_lso_list_offsets),
]


# --------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show kafka-python warnings on stderr")
    parser.add_argument("--broker-log", type=Path, help="append the Tansu broker's output to this file")
    parser.add_argument("--crash-child", nargs=4, metavar=("BOOTSTRAP", "TOPIC", "TXN_ID", "TIMEOUT_MS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.debug else logging.CRITICAL + 1, stream=sys.stderr)
    if args.crash_child:
        bootstrap, topic, txn_id, timeout_ms = args.crash_child
        crash_child(bootstrap, topic, txn_id, int(timeout_ms))
        return 0

    started = time.monotonic()
    with EmbeddedBroker(log_file=args.broker_log) as broker:
        ctx = Context(bootstrap=broker.bootstrap)
        create_topics(ctx.bootstrap, ctx.topics())
        for check in CHECKS:
            run_check(ctx, check.name, check.run, check.timeout_s)
    passed = sum(ok for _, ok in ctx.results)
    print(f"{passed}/{len(ctx.results)} checks passed in {time.monotonic() - started:.0f} s "
          f"(Tansu via {broker.bootstrap})", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # a check that timed out may leave a client thread blocked; do not wait for it
