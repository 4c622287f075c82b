"""The world around fails: the broker is late, goes away mid-run, or refuses a record for good.

The daemon never exits, never commits past an event whose outputs the broker did not acknowledge, and
serves again as soon as it can. The embedded broker forgets everything when it stops, so after a restart
the truth is what it holds from then on: the events produced after its return.
"""

import json
import time
from collections import Counter

import pytest
from conftest import (
    DaemonProcess,
    consume_exactly,
    daemon_metric,
    event_value,
    http_get,
    metric,
    offline_predictions,
    produce,
    read_all,
    wait_until,
)
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streamlstm.demo.broker import EmbeddedBroker, free_port
from streamlstm.transport.clients import DLQ_DETAIL, DLQ_REASON, DLQ_TRUNCATED

OUTAGE_S = 5  # longer than the daemon's first backoffs (1, 2 s): it retries through the outage


def test_a_daemon_started_before_its_broker_waits_alive_and_serves_when_it_appears(tmp_path, model_dir):
    """Broker down at start for 5 s: no crash, /healthz 200 and /readyz 503 meanwhile, then serving."""
    absent = EmbeddedBroker(free_port(), log_file=tmp_path / "late-broker.log")
    daemon = DaemonProcess(tmp_path, absent, model_dir)
    try:
        daemon.start(wait_ready=False)
        daemon.wait_for(lambda: http_get(daemon.port, "/healthz")[0] == 200, 30, "the http endpoints")
        assert http_get(daemon.port, "/readyz")[0] == 503
        time.sleep(OUTAGE_S)  # the scenario: the broker stays away
        assert http_get(daemon.port, "/healthz")[0] == 200 and http_get(daemon.port, "/readyz")[0] == 503
        with absent as broker:
            daemon.wait_for(lambda: http_get(daemon.port, "/readyz")[0] == 200, 90, "ready once the broker is up")
            produce(broker, daemon.topic, [(b"late", event_value([1, 2, 3]))])
            wait_until(lambda: len(read_all(broker, daemon.kafka["output_topic"], 5)) == 1, 60, "the prediction")
            assert daemon.stop() == 0
    finally:
        daemon.kill()


def events(keys: int, count: int, ts0: int) -> list[dict]:
    return [{"key": f"k{i % keys}", "features": [i % 7, i % 5, i % 24], "ts": ts0 + i} for i in range(count)]


def messages(batch: list[dict]) -> list[tuple[bytes, bytes]]:
    return [(e["key"].encode(), event_value(e["features"], e["ts"])) for e in batch]


def test_broker_stopped_mid_run_and_restarted_every_later_event_is_predicted(tmp_path, model_dir):
    """The broker goes away for 5 s and comes back empty on the same port: the daemon lives through it,
    notices that its records were refused, redoes from the (new) broker's committed offsets, and predicts
    every event produced after the return, each exactly as offline over what the broker now holds."""
    broker = EmbeddedBroker(free_port(), log_file=tmp_path / "broker.log").start()
    daemon = DaemonProcess(tmp_path, broker, model_dir)
    try:
        daemon.start()
        before = events(20, 200, 1_000)
        produce(broker, daemon.topic, messages(before))
        wait_until(lambda: len(read_all(broker, daemon.kafka["output_topic"], 5)) >= len(before), 60,
                   "predictions before the outage", daemon.log)
        broker.stop()
        time.sleep(OUTAGE_S)  # the scenario: the broker stays away
        assert daemon.proc.poll() is None and http_get(daemon.port, "/healthz")[0] == 200
        broker.start()
        after = events(20, 200, 100_000)
        produce(broker, daemon.topic, messages(after))

        def predicted() -> dict[int, list[dict]]:
            out: dict[int, list[dict]] = {}
            for record in read_all(broker, daemon.kafka["output_topic"], 5):
                p = json.loads(record.value)
                out.setdefault(p["event_ts"], []).append(p)
            return out

        daemon.wait_for(lambda: {e["ts"] for e in after} <= predicted().keys(), 120, "every later event predicted")
        expected = offline_predictions(tmp_path, model_dir, after)
        for ts, published in predicted().items():
            for p in published:
                assert p["step"] == expected[ts]["step"]
                assert max(abs(a - b) for a, b in zip(p["prediction"], expected[ts]["prediction"])) < 1e-5
        assert daemon_metric(daemon, "streamlstm_rewinds_total") >= 1
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        broker.stop()


def send_with_one_poison(broker, topic: str, poison: tuple[bytes, bytes]) -> tuple[dict[int, list], object]:
    """40 events over partitions 0-3, the 21st (partition 0's 6th) replaced by `poison` (key, value).
    Returns the metadata of what each partition got, and the poison's."""
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=4 << 20)
    sent: dict[int, list] = {}
    for i in range(40):
        key, value = poison if i == 20 else (f"k{i}".encode(), event_value([i, 1, 2], i))
        sent.setdefault(i % 4, []).append(producer.send(topic, key=key, value=value, partition=i % 4).get(timeout=30))
    producer.close()
    return sent, sent[0][5]


def predicted_by_partition(broker, daemon) -> dict[int, set[int]]:
    by_partition: dict[int, set[int]] = {}
    for record in read_all(broker, daemon.kafka["output_topic"], 5):
        source = json.loads(record.value)["source"]
        by_partition.setdefault(source["partition"], set()).add(source["offset"])
    return by_partition


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_an_event_too_large_for_any_record_is_dead_lettered_cut_and_its_partition_goes_on(
        broker, daemon_factory, client):
    """A 1.5 MB event (value_too_large): whole, its dead letter would exceed the producer's 1 MiB request
    limit and hold its partition for good. Cut to fit, and saying so, it is delivered, and every other
    event of its partition is predicted."""
    daemon = daemon_factory(kafka__client=client).start()
    value = b'{"features": [1, 2, 3]}' + b" " * 1_500_000
    sent, poison = send_with_one_poison(broker, daemon.topic, (b"k20", value))
    [letter] = consume_exactly(broker, daemon.kafka["dlq_topic"], 1)
    headers = dict(letter.headers)
    assert headers[DLQ_REASON] == b"value_too_large" and headers[DLQ_TRUNCATED] == str(len(value)).encode()
    assert letter.key == b"k20" and 1_000_000 < len(letter.value) < 1 << 20 and value.startswith(letter.value)
    assert b"cut to fit one record of 1048576 bytes: value of 1500023 bytes" in headers[DLQ_DETAIL]
    consume_exactly(broker, daemon.kafka["output_topic"], 39)
    assert predicted_by_partition(broker, daemon)[0] == {m.offset for m in sent[0]} - {poison.offset}
    assert daemon_metric(daemon, "streamlstm_rewinds_total") == 0
    assert daemon.stop() == 0


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_record_the_broker_refuses_for_good_stops_its_partition_and_is_never_committed_past(
        broker, daemon_factory, client):
    """An event with a 1.5 MB key, accepted (events.max_key_bytes raised to 2 MB): its prediction exceeds
    the producer's 1 MiB request limit and can never be written. The daemon retries with backoff, stays
    alive and not ready, never commits its partition past it, and keeps serving the other partitions.
    Its first retry commits up to the refused record, so later ones redo (and publish again) nothing else."""
    daemon = daemon_factory(kafka__client=client, events__max_key_bytes=2_000_000).start()
    sent, poison = send_with_one_poison(broker, daemon.topic, (b"k" * 1_500_000, event_value([1, 2, 3])))

    refused = f'streamlstm_delivery_failures_total{{topic="{daemon.kafka["output_topic"]}"}}'
    daemon.wait_for(lambda: metric(http_get(daemon.port, "/metrics")[1], refused) >= 4, 90,
                    "four refused tries of the prediction")
    assert http_get(daemon.port, "/healthz")[0] == 200 and http_get(daemon.port, "/readyz")[0] == 503
    by_partition = predicted_by_partition(broker, daemon)
    for partition in (1, 2, 3):
        assert by_partition[partition] == {m.offset for m in sent[partition]}
    assert by_partition[0] == {m.offset for m in sent[0][:5]}, "nothing after the refused record"
    published = Counter((source["partition"], source["offset"]) for source in
                        (json.loads(r.value)["source"] for r in read_all(broker, daemon.kafka["output_topic"], 5)))
    assert max(published[0, m.offset] for m in sent[0][:5]) <= 2, "published by the first try and its first retry"
    assert daemon.stop() == 0
    group = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=daemon.kafka["group_id"])
    assert group.committed(TopicPartition(daemon.topic, 0)) == poison.offset
    group.close()
