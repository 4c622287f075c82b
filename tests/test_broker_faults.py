"""The world around fails: the broker is late, goes away mid-run, or refuses a record for good.

The daemon never exits, never commits past an event whose outputs the broker did not acknowledge, and
serves again as soon as it can. The embedded broker forgets everything when it stops, so after a restart
the truth is what it holds from then on: the events produced after its return.
"""

import json
import time

import pytest
from conftest import (
    DaemonProcess,
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

from streamlstm.broker import EmbeddedBroker, free_port

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


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_record_the_dead_letter_topic_refuses_stops_its_partition_and_is_never_committed_past(
        broker, daemon_factory, client):
    """A 1.5 MB event is rejected (value_too_large) but its dead letter exceeds the producer's 1 MiB
    request limit: it can never be written. The daemon retries with backoff, stays alive and not ready,
    never commits its partition past it, and keeps serving the other partitions."""
    daemon = daemon_factory(kafka__client=client).start()
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=4 << 20)
    sent: dict[int, list] = {}
    for i in range(40):
        partition = i % 4
        value = b'{"features": [1, 2, 3]}' + b" " * 1_500_000 if i == 20 else event_value([i, 1, 2], i)
        sent.setdefault(partition, []).append(producer.send(daemon.topic, key=f"k{i}".encode(), value=value,
                                                            partition=partition).get(timeout=30))
    producer.close()
    poison = sent[0][5]  # the 21st event went to partition 0, as its 6th record

    refused = f'streamlstm_delivery_failures_total{{topic="{daemon.kafka["dlq_topic"]}"}}'
    daemon.wait_for(lambda: refused in http_get(daemon.port, "/metrics")[1] and metric(
        http_get(daemon.port, "/metrics")[1], refused) >= 3, 90, "three refused tries of the dead letter")
    assert http_get(daemon.port, "/healthz")[0] == 200 and http_get(daemon.port, "/readyz")[0] == 503
    by_partition: dict[int, set[int]] = {}
    for record in read_all(broker, daemon.kafka["output_topic"], 5):
        source = json.loads(record.value)["source"]
        by_partition.setdefault(source["partition"], set()).add(source["offset"])
    for partition in (1, 2, 3):
        assert by_partition[partition] == {m.offset for m in sent[partition]}
    assert by_partition[0] == {m.offset for m in sent[0][:5]}, "nothing after the refused record"
    assert daemon.stop() == 0
    group = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=daemon.kafka["group_id"])
    assert (group.committed(TopicPartition(daemon.topic, 0)) or 0) <= poison.offset
    group.close()
