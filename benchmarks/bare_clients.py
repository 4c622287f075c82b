"""The end-to-end benchmark's plain Kafka clients, each run as its own light process (no torch, no
streamlstm imported): the relays that set the ceiling (kafka-python's, and confluent-kafka's for
`kafka.client: confluent`), and the paced producer of live events (confluent-kafka, the lightest).

    python benchmarks/bare_clients.py relay BOOTSTRAP SOURCE SINK GROUP COUNT [live]
    python benchmarks/bare_clients.py relay-confluent BOOTSTRAP SOURCE SINK GROUP COUNT [live]
    python benchmarks/bare_clients.py paced BOOTSTRAP TOPIC COUNT KEYS SEED RATE

`live`: the relay as a latency control. It prints "assigned" once it holds its partitions (so that the
paced producer can start without a group join inside the measurement), and carries each input record's
timestamp to its output in an `event_ts` header, as a prediction carries `event_ts`. A relay prints
`draining` when its first records arrive and, last, `cpu_s SECONDS`: its CPU time (all threads) from
then to its end.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import OffsetAndMetadata

# The daemon's defaults (streamlstm.transport.clients.PRODUCER_SETTINGS and config.KafkaConfig / StateConfig),
# repeated rather than imported so that this process stays as light as a user's own relay would be.
PRODUCER_SETTINGS = {"acks": "all", "linger_ms": 5, "batch_size": 256 * 1024, "max_block_ms": 5000,
                     "request_timeout_ms": 10000, "delivery_timeout_ms": 20000, "max_request_size": 1 << 20}
MAX_POLL_RECORDS, POLL_TIMEOUT_MS, FETCH_MAX_WAIT_MS, CHECKPOINT_INTERVAL_S = 2000, 100, 20, 5.0
FEATURE_MEAN, FEATURE_STD = (10.0, 20.0, 12.0), (3.0, 5.0, 7.0)


def event_values(count: int, keys: int, seed: int) -> list[tuple[bytes, bytes]]:
    """Wire-format events without `ts`: event time is the record's timestamp, as most producers do."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, keys, count)
    x = rng.standard_normal((count, len(FEATURE_MEAN))) * FEATURE_STD + FEATURE_MEAN
    return [(f"meter-{k:06d}".encode(), b'{"features":[%.4f,%.4f,%.4f]}' % tuple(row)) for k, row in zip(ids, x)]


def relay(bootstrap: str, source: str, sink: str, group: str, count: int, live: bool) -> None:
    """The ceiling: consume, produce the same bytes, flush and commit each checkpoint interval."""
    consumer = KafkaConsumer(source, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                             auto_offset_reset="earliest", session_timeout_ms=6000, heartbeat_interval_ms=1000,
                             max_poll_records=MAX_POLL_RECORDS, fetch_max_wait_ms=FETCH_MAX_WAIT_MS)
    producer = KafkaProducer(bootstrap_servers=bootstrap, **PRODUCER_SETTINGS)
    if live:
        while not consumer.assignment():
            consumer.poll(timeout_ms=POLL_TIMEOUT_MS)  # nothing is produced before "assigned"
        print("assigned", flush=True)
    done, relayed, cpu_start = {}, 0, None
    next_commit = time.monotonic() + CHECKPOINT_INTERVAL_S
    while relayed < count:
        batches = consumer.poll(timeout_ms=POLL_TIMEOUT_MS, max_records=MAX_POLL_RECORDS)
        if cpu_start is None and batches:
            cpu_start = draining()
        for tp, records in batches.items():
            for record in records:
                headers = [("event_ts", b"%d" % record.timestamp)] if live else None
                producer.send(sink, key=record.key, value=record.value, headers=headers)
            done[tp] = OffsetAndMetadata(records[-1].offset + 1, "", -1)
            relayed += len(records)
        if time.monotonic() >= next_commit or relayed >= count:
            producer.flush()
            consumer.commit(done)
            next_commit = time.monotonic() + CHECKPOINT_INTERVAL_S
    producer.close()
    consumer.close()
    report_cpu(cpu_start)


def relay_confluent(bootstrap: str, source: str, sink: str, group: str, count: int, live: bool) -> None:
    """The same relay on confluent-kafka, with the same settings in librdkafka's names."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                         "auto.offset.reset": "earliest", "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000,
                         "fetch.wait.max.ms": FETCH_MAX_WAIT_MS})
    consumer.subscribe([source])
    s = PRODUCER_SETTINGS
    producer = Producer({"bootstrap.servers": bootstrap, "acks": s["acks"], "enable.idempotence": True,
                         "linger.ms": s["linger_ms"], "batch.size": s["batch_size"],
                         "request.timeout.ms": s["request_timeout_ms"], "message.timeout.ms": s["delivery_timeout_ms"],
                         "message.max.bytes": s["max_request_size"], "partitioner": "murmur2_random"})
    if live:
        while not consumer.assignment():
            consumer.consume(1, POLL_TIMEOUT_MS / 1000)  # nothing is produced before "assigned"
        print("assigned", flush=True)
    done, relayed, cpu_start = {}, 0, None
    next_commit = time.monotonic() + CHECKPOINT_INTERVAL_S
    while relayed < count:
        # What is there, else wait for one: consume(n, t) waits for all n, holding live events.
        messages = consumer.consume(MAX_POLL_RECORDS, 0) or consumer.consume(1, POLL_TIMEOUT_MS / 1000)
        if cpu_start is None and messages:
            cpu_start = draining()
        for m in messages:
            headers = [("event_ts", b"%d" % m.timestamp()[1])] if live else None
            producer.produce(sink, m.value(), m.key(), headers=headers)
            done[m.partition()] = m.offset() + 1
        relayed += len(messages)
        producer.poll(0)
        if done and (time.monotonic() >= next_commit or relayed >= count):
            producer.flush()
            consumer.commit(offsets=[TopicPartition(source, p, o) for p, o in done.items()], asynchronous=False)
            next_commit = time.monotonic() + CHECKPOINT_INTERVAL_S
    consumer.close()
    report_cpu(cpu_start)


def draining() -> float:
    """Say so at the first records (the benchmark starts its clocks), and return our CPU time so far."""
    print("draining", flush=True)
    return time.process_time()


def report_cpu(start: float) -> None:
    """The process's CPU seconds (all its threads) from its first records to its end, for the benchmark."""
    print(f"cpu_s {time.process_time() - start:.4f}", flush=True)


def paced(bootstrap: str, topic: str, events: list[tuple[bytes, bytes]], rate: float) -> None:
    """Produce events at `rate` per second (each record timestamped at its send), then flush.
    confluent-kafka: 30 000 sends a second cost it a few percent of a core, kafka-python most of one."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1, "batch.size": 256 * 1024,
                         "queue.buffering.max.messages": 1_000_000, "partitioner": "murmur2_random"})
    start, sent = time.monotonic(), 0
    while sent < len(events):
        due = min(len(events), int((time.monotonic() - start) * rate) + 1)
        for key, value in events[sent:due]:
            producer.produce(topic, value, key)
        producer.poll(0)
        sent = due
        time.sleep(0.0005)
    producer.flush()


def main(argv: list[str]) -> None:
    command, bootstrap, topic, *rest = argv
    if command in ("relay", "relay-confluent"):
        sink, group, count, *live = rest
        (relay if command == "relay" else relay_confluent)(bootstrap, topic, sink, group, int(count), live == ["live"])
    else:
        count, keys, seed, rate = rest
        paced(bootstrap, topic, event_values(int(count), int(keys), int(seed)), float(rate))


if __name__ == "__main__":
    main(sys.argv[1:])
