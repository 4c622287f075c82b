"""The daemon end to end, against the real embedded broker, as a real subprocess."""

import itertools
import json
import random
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Producer
from conftest import (
    NotUtf8,
    assert_equals_offline,
    consume_exactly,
    event_value,
    http_get,
    metric,
    offline_predictions,
    produce,
)
from kafka import KafkaProducer

from streamlstm.config import KafkaConfig
from streamlstm.events import REASONS
from streamlstm.transport.admin import ensure_topics
from streamlstm.transport.clients import DLQ_DETAIL, DLQ_REASON, DLQ_SOURCE, DLQ_TRUNCATED

KEYS, GOOD_EVENTS = 160, 2400
BAD_TEMP = {"non_numeric_feature": "warm", "non_finite_feature": float("nan")}  # the values bad_event sends


def bad_event(reason: str, key: bytes, ts: int) -> tuple[bytes | None, bytes]:
    """An event that is wrong in exactly one way; most keep the good events' key."""
    value = {
        "not_utf8": b"\xff\xfe\xfd",
        "not_json": b'{"features": [1, 2',
        "not_object": b"[1, 2, 3]",
        "unknown_field": b'{"features": [1, 2, 3], "colour": "red"}',
        "missing_features": b'{"ts": 1}',
        "wrong_feature_count": b'{"features": [1, 2]}',
        "unknown_feature": b'{"features": {"load": 1, "temp": 2, "hour": 3, "wind": 4}}',
        "missing_feature": b'{"features": {"load": 1, "temp": 2}}',
        "non_numeric_feature": b'{"features": [1, "warm", 3], "ts": %d}' % ts,
        "non_finite_feature": b'{"features": [1, NaN, 3], "ts": %d}' % ts,
        "bad_ts": b'{"features": [1, 2, 3], "ts": "noon"}',
        "bad_control": b'{"features": [1, 2, 3], "reset": "yes"}',
        "bad_label": b'{"features": [1, 2, 3], "label": true}',
        "value_too_large": b'{"features": [1, 2, 3]}' + b" " * 400_000,  # max_value_bytes: 65 536
    }.get(reason, event_value([1, 2, 3], ts))
    return {"bad_key": b"", "key_too_large": b"k" * 2000}.get(reason, key), value  # max_key_bytes: 1024


REPLACEABLE = {"non_numeric_feature", "non_finite_feature"}  # the temp value; accepted under replace_with_mean


def workload(replace: bool, seed: int = 3) -> tuple[list[dict], list[tuple[bytes | None, bytes]], Counter]:
    """Good events of KEYS keys, interleaved, each with a unique ts; after two good events in three a bad
    one (40 % of the stream), of every kind in turn, mostly with the same key as the good one before it.

    Returns the events the daemon must predict (in stream order), the stream, and the expected dead
    letters as (reason, key, value) counts: each the bad event's own bytes, whole (400 KB among them).
    """
    rng = random.Random(seed)
    good, stream, dead, kinds = [], [], Counter(), itertools.cycle(REASONS)
    for i in range(GOOD_EVENTS):
        key = f"meter-{rng.randrange(KEYS)}" if i >= KEYS else f"meter-{i}"
        features = [round(rng.gauss(10, 3), 4), round(rng.gauss(20, 5), 4), rng.randrange(24)]
        good.append({"key": key, "features": features, "ts": 1_700_000_000_000 + i})
        stream.append((key.encode(), event_value(features, 1_700_000_000_000 + i)))
        if i % 3:
            reason, ts = next(kinds), 1_800_000_000_000 + i
            stream.append(bad_event(reason, key.encode(), ts))
            if replace and reason in REPLACEABLE:
                good.append({"key": key, "features": [1, BAD_TEMP[reason], 3], "ts": ts})  # as sent
            else:
                dead[reason, *stream[-1]] += 1
    stream.append((None, event_value([1, 2, 3])))  # no key at all
    dead["bad_key", *stream[-1]] += 1
    return good, stream, dead


@pytest.mark.parametrize("policy,client", [("reject", "kafka-python"), ("replace_with_mean", "kafka-python"),
                                           ("reject", "confluent")])
def test_streaming_equals_offline_and_rejections_change_nothing(tmp_path, broker, model_dir, daemon_factory,
                                                                 policy, client):
    good, stream, dead = workload(replace=policy == "replace_with_mean")
    assert sum(dead.values()) >= 0.3 * len(stream) and {r for r, _, _ in dead} >= set(REASONS) - REPLACEABLE
    daemon = daemon_factory(events__invalid_feature=policy, kafka__client=client)
    ensure_topics(KafkaConfig(**daemon.kafka))
    produce(broker, daemon.topic, stream)  # all before the daemon starts: polls hold keys many times
    daemon.start()

    published = consume_exactly(broker, daemon.kafka["output_topic"], len(good))
    letters = consume_exactly(broker, daemon.kafka["dlq_topic"], sum(dead.values()))

    # offline under the same events settings: predict replaces the bad values with the means as the daemon does
    expected = offline_predictions(tmp_path, model_dir, good, (f"events.invalid_feature={policy}",))
    seen = assert_equals_offline(published, expected, daemon.topic)
    assert len(seen) == len(good) and len({part for part, _ in seen}) == 4
    # as many output as input partitions: each prediction sits in its event's partition (co-partitioned)
    assert all(r.partition == json.loads(r.value)["source"]["partition"] for r in published)

    # every bad event, with its reason and its original bytes, whole, and where it came from
    assert Counter((dict(r.headers)[DLQ_REASON].decode(), r.key, r.value) for r in letters) == dead
    assert not any(DLQ_TRUNCATED in dict(r.headers) for r in letters)
    assert all(dict(r.headers)[DLQ_SOURCE].decode().startswith(daemon.topic + "/") for r in letters)

    daemon.wait_for(lambda: metric(http_get(daemon.port, "/metrics")[1], "streamlstm_checkpoints_total") > 0,
                    10, "a checkpoint")
    text = http_get(daemon.port, "/metrics")[1]
    assert metric(text, "streamlstm_events_consumed_total") == len(stream)
    assert metric(text, "streamlstm_predictions_produced_total") == len(good)
    for reason, count in Counter(r for r, _, _ in dead.elements()).items():
        assert metric(text, "streamlstm_events_rejected_total", f'{{reason="{reason}"}}') == count
    replaced = len(good) - GOOD_EVENTS
    assert metric(text, "streamlstm_features_replaced_total") == replaced and (replaced > 0) == (policy != "reject")
    assert metric(text, "streamlstm_live_keys") == KEYS
    assert metric(text, "streamlstm_assigned_partitions") == 4
    assert metric(text, "streamlstm_step_batch_size_sum") == len(good)
    # more steps than polls: some polls held a key several times and advanced it in successive steps
    assert metric(text, "streamlstm_step_batch_size_count") > metric(text, "streamlstm_poll_records_count")
    assert 'streamlstm_model_info{' in text and "streamlstm_prediction_latency_seconds_bucket" in text
    assert http_get(daemon.port, "/healthz") == (200, "ok\n")
    assert http_get(daemon.port, "/readyz")[0] == 200

    assert daemon.stop(signal.SIGTERM) == 0
    assert "Traceback" not in daemon.log()


def hostile_records(rng: random.Random) -> list[tuple[bytes | None, bytes | None]]:
    """Records that are no event, some made to hit the limits of the parsers and of the numbers the
    daemon keeps: each must be dead-lettered and nothing else."""
    return [
        (b"h", b"[" * 3000), (b"h", b'{"features": ' * 3000 + b"1" + b"}" * 3000),  # nested too deep to parse
        (b"h", b'{"features": [1, 2, 3], "ts": 1e300}'), (b"h", b'{"features": [1, 2, 3], "ts": %d}' % 2**64),
        (b"h", b'{"features": [1e39, 2, 3]}'), (b"h", b'{"features": [1, %d, 3]}' % 10**400),
        (b"h", b'{"features": [3.4028234663852886e38, -3.4028234663852886e38, 3e38]}'),  # beyond the model's limits
        (b"h", None), (b"h", b""), (None, event_value([1, 2, 3])),
        *((rng.randbytes(rng.randrange(8)), rng.randbytes(rng.randrange(300))) for _ in range(40)),
    ]


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_hostile_records_are_dead_lettered_and_the_daemon_serves_on(tmp_path, broker, model_dir, daemon_factory,
                                                                     client):
    """Whatever a producer writes (random bytes, JSON too deep to parse, numbers beyond what the daemon
    keeps, null header values, odd record timestamps), the daemon dead-letters it and goes on serving,
    on the event-time TTL clock too; the good events around it are predicted as offline."""
    rng = random.Random(5)
    good = [{"key": f"k{i % 20}", "features": [rng.gauss(10, 3), rng.gauss(20, 5), i % 24],
             "ts": 1_700_000_000_000 + i} for i in range(200)]
    hostile = hostile_records(rng)
    stream = [(e["key"].encode(), event_value(e["features"], e["ts"])) for e in good]
    for record in hostile:  # among the good events, which stay in order
        stream.insert(rng.randrange(len(stream) + 1), record)
    daemon = daemon_factory(kafka__client=client, state__ttl_clock="event_time")
    ensure_topics(KafkaConfig(**daemon.kafka))
    # confluent-kafka's producer, which writes null header values (kafka-python's refuses them)
    producer = Producer({"bootstrap.servers": broker.bootstrap, "partitioner": "murmur2_random"})
    for i, (key, value) in enumerate(stream):
        producer.produce(daemon.topic, value, key, headers=[("n", None)] if i % 2 else None,
                         timestamp=rng.choice([0, 1, 2**62, 1_700_000_000_000]))
    producer.flush()
    daemon.start()

    published = consume_exactly(broker, daemon.kafka["output_topic"], len(good))
    assert_equals_offline(published, offline_predictions(tmp_path, model_dir, good), daemon.topic)
    letters = consume_exactly(broker, daemon.kafka["dlq_topic"], len(hostile))
    assert Counter((r.key, r.value) for r in letters) == Counter(hostile)
    assert http_get(daemon.port, "/healthz") == (200, "ok\n") and http_get(daemon.port, "/readyz")[0] == 200
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log()


def produce_around_an_unreadable_header(broker, topic: str) -> None:
    """An event before, one with an unreadable header name, one after; all on partition 0, in order."""
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    for key, headers in ((b"before", None), (b"odd", [(NotUtf8("trace"), b"1")]), (b"after", None)):
        producer.send(topic, key=key, value=event_value([1, 2, 3]), headers=headers, partition=0).get(10)
    producer.close()


def test_on_kafka_python_a_record_it_cannot_parse_stops_the_daemon_naming_the_way_on(broker, daemon_factory):
    """kafka-python cannot parse a header name that is not UTF-8 and, after raising once, would spin in
    poll() for ever: the daemon stops instead, with exit code 2 and a message that says what to do."""
    daemon = daemon_factory()
    ensure_topics(KafkaConfig(**daemon.kafka))
    produce_around_an_unreadable_header(broker, daemon.topic)
    daemon.start(wait_ready=False)
    assert daemon.proc.wait(timeout=60) == 2
    log = daemon.log()
    assert "cannot read a record" in log and "kafka.client: confluent" in log and "Traceback" not in log
    assert [r.key for r in consume_exactly(broker, daemon.kafka["output_topic"], 1)] == [b"before"]


def test_on_confluent_kafka_a_header_name_that_is_not_utf8_is_dropped_and_the_event_served(broker, daemon_factory):
    daemon = daemon_factory(kafka__client="confluent")
    ensure_topics(KafkaConfig(**daemon.kafka))
    produce_around_an_unreadable_header(broker, daemon.topic)
    daemon.start()
    published = consume_exactly(broker, daemon.kafka["output_topic"], 3)
    assert [(r.key, r.headers) for r in published] == [(b"before", []), (b"odd", []), (b"after", [])]
    assert "a header name is not UTF-8" in daemon.log()
    assert daemon.stop() == 0


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_headers_travel_from_an_event_to_its_prediction_and_its_dead_letter(broker, daemon_factory, client):
    """A prediction carries its event's headers (trace context, correlation ids: Kafka Streams forwards
    them too); a dead letter keeps the original's, so it can be fixed and sent again, and has one fresh
    reason of ours even when it was a dead letter sent back unfixed. A null header value goes out empty."""
    daemon = daemon_factory(kafka__client=client)
    ensure_topics(KafkaConfig(**daemon.kafka))
    trace = [("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"), ("tenant", b"acme")]
    sent_back = [("tenant", b"acme"), (DLQ_REASON, b"bad_ts"), (DLQ_SOURCE, b"events/0/7")]
    produce(broker, daemon.topic, [(b"traced", event_value([1, 2, 3]), trace), (b"plain", event_value([1, 2, 3])),
                                   (b"traced", b'{"features": [1, 2', sent_back)])
    # A null header value, which Kafka allows and Java clients write (kafka-python's producer cannot).
    nulls = [("flag", None), ("tenant", b"acme")]
    null_producer = Producer({"bootstrap.servers": broker.bootstrap, "partitioner": "murmur2_random"})
    for value in (event_value([4, 5, 6]), b"[1, 2, 3]"):
        null_producer.produce(daemon.topic, value, b"nulls", headers=nulls)
    null_producer.flush()
    daemon.start()
    published = {r.key: r.headers for r in consume_exactly(broker, daemon.kafka["output_topic"], 3)}
    assert published == {b"traced": trace, b"plain": [], b"nulls": [("flag", b""), ("tenant", b"acme")]}
    letters = {r.key: r.headers for r in consume_exactly(broker, daemon.kafka["dlq_topic"], 2)}
    assert letters[b"traced"][0] == ("tenant", b"acme") and letters[b"nulls"][:2] == published[b"nulls"]
    for headers, reason in ((letters[b"traced"], b"not_json"), (letters[b"nulls"], b"not_object")):
        ours = [(name, value) for name, value in headers if name.startswith("streamlstm.")]
        assert [name for name, _ in ours] == [DLQ_REASON, DLQ_DETAIL, DLQ_SOURCE] and dict(ours)[DLQ_REASON] == reason
    assert daemon.stop() == 0


def test_stop_signals_end_the_daemon_cleanly_and_commit(broker, daemon_factory):
    """SIGTERM to one daemon, SIGINT to its successor in the group: each ends cleanly, and the next one
    repeats none of its predictions (a clean stop committed everything)."""
    daemon = daemon_factory().start()
    # start() waited for /readyz 200, which must come only after the assignment
    assert re.search(r"assigned partitions \[0, 1, 2, 3\]", daemon.log())
    produce(broker, daemon.topic, [(b"k1", event_value([1, 2, 3])), (b"k2", event_value([4, 5, 6]))])
    consume_exactly(broker, daemon.kafka["output_topic"], 2)
    for count, sig in enumerate((signal.SIGTERM, signal.SIGINT), start=3):
        assert daemon.stop(sig) == 0
        log = daemon.log()
        assert "Traceback" not in log and "stopped" in log
        daemon = daemon.replica().start()  # same group, same topics
        produce(broker, daemon.topic, [(f"k{count}".encode(), event_value([1, 1, 1]))])
        assert len(consume_exactly(broker, daemon.kafka["output_topic"], count)) == count
    assert daemon.stop() == 0


def test_broker_command_stops_cleanly_and_leaves_no_process(tmp_path):
    from streamlstm.demo.broker import free_port

    port = free_port()
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen([sys.executable, "-m", "streamlstm", "broker", "--port", str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip().endswith(f"127.0.0.1:{port}")
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
        assert "Traceback" not in proc.stderr.read()
        assert not [p for p in Path("/proc").glob("[0-9]*/cmdline")
                    if f"127.0.0.1:{port}".encode() in _read(p)], "tansu still running"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
