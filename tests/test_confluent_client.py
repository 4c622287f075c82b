"""`kafka.client: confluent`: the daemon on librdkafka keeps every promise it keeps on kafka-python.

Against the real embedded broker, and in the same consumer group as kafka-python daemons: the two
clients must agree on offsets, changelog and partitioning for state to follow a partition between them.
"""

from __future__ import annotations

import time

import pytest
import yaml
from conftest import (
    consume_exactly,
    daemon_metric,
    event_value,
    produce,
    unique,
    wait_until,
)
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from test_durable_state import (
    Feeder,
    assert_exact,
    make_events,
    predictions_by_source,
    prepare,
)

from streamlstm.config import ConfigError, KafkaConfig, StateConfig, load_config
from streamlstm.state import changelog
from streamlstm.transport import open_changelog
from streamlstm.transport.api import Record
from streamlstm.transport.clients import DLQ_REASON
from streamlstm.transport.confluent import ConfluentChangelogReader, confluent_settings


def test_security_settings_reach_librdkafka_under_its_own_names():
    env = {"STREAMLSTM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "STREAMLSTM_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
           "STREAMLSTM_KAFKA__SASL_PLAIN_USERNAME": "svc", "STREAMLSTM_KAFKA__SASL_PLAIN_PASSWORD": "s3cr3t:42",
           "STREAMLSTM_KAFKA__SSL_CAFILE": "/etc/kafka/ca.pem", "STREAMLSTM_KAFKA__SSL_CHECK_HOSTNAME": "false"}
    settings = confluent_settings(load_config(environ=env).kafka)
    assert settings == {"bootstrap.servers": "127.0.0.1:9092", "security.protocol": "SASL_SSL",
                        "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "svc", "sasl.password": "s3cr3t:42",
                        "ssl.ca.location": "/etc/kafka/ca.pem", "ssl.endpoint.identification.algorithm": "none"}
    assert confluent_settings(load_config(environ={}).kafka) == {"bootstrap.servers": "127.0.0.1:9092",
                                                                 "security.protocol": "PLAINTEXT"}


def test_exactly_once_with_the_confluent_client_stops_startup_naming_both_keys():
    with pytest.raises(ConfigError, match="kafka.client: confluent supports processing_guarantee at_least_once"):
        load_config(overrides=["kafka.client=confluent", "kafka.processing_guarantee=exactly_once"], environ={})
    with pytest.raises(ConfigError, match="kafka.client: 'librdkafka' is not one of kafka-python, confluent"):
        load_config(overrides=["kafka.client=librdkafka"], environ={})


def test_a_mixed_group_survives_kill_9_and_joins_with_state_exact(tmp_path, broker, model_dir, daemon_factory):
    """A kafka-python daemon and confluent ones share the group while events flow; the confluent one is
    killed with -9 and another joins. Every event is predicted at its own step count, as offline."""
    events = make_events(8_000, 500, seed=21)
    bad = [(f"k{i}".encode(), b'{"features": [1, 2]}') for i in range(10)]
    first = daemon_factory(kafka__client="confluent")
    prepare(first)
    produce(broker, first.topic, bad)
    python = first.replica()
    python.config["kafka"] = {**first.kafka, "client": "kafka-python"}
    python.config_file.write_text(yaml.safe_dump(python.config))
    group = [first.start(), python.start()]
    feeder = Feeder(broker.bootstrap, first.topic, events, per_second=500)
    feeder.start()
    wait_until(lambda: feeder.sent > 2_000, 30, "a quarter of the events sent")
    first.kill()  # SIGKILL: no checkpoint, no leaving the group
    wait_until(lambda: feeder.sent > 4_000, 30, "half of the events sent")
    group.append(first.replica().start())
    feeder.join()

    found = predictions_by_source(broker, first.kafka["output_topic"], len(events))
    assert_exact(tmp_path, model_dir, events, found)
    letters = consume_exactly(broker, first.kafka["dlq_topic"], len(bad))
    assert {dict(r.headers)[DLQ_REASON] for r in letters} == {b"wrong_feature_count"}
    assert daemon_metric(group[2], "streamlstm_restored_keys_total", '{source="changelog"}') > 0
    assert all(d.stop() == 0 for d in group[1:])


def read_until_caught_up(reader, partitions: set[int], timeout_s: float = 30) -> dict[int, list[tuple]]:
    """What a restore of `partitions` reads, as Restorer drives a reader: poll, then ask caught_up."""
    read: dict[int, list[tuple]] = {p: [] for p in partitions}
    deadline = time.monotonic() + timeout_s
    while not partitions <= reader.caught_up():
        assert time.monotonic() < deadline, f"not caught up: {partitions - reader.caught_up()}"
        for r in reader.poll(50):
            assert isinstance(r, Record)
            read.setdefault(r.partition, []).append((r.offset, r.key, r.value, r.headers))
    return read


def test_the_confluent_changelog_reader_reads_partitions_from_their_start_to_their_end(broker):
    """Outside the group (assigned, not subscribed), from offset 0 to the end the last fetch reported,
    each time a partition is started; an empty partition is caught up once its end is known. librdkafka
    remembers a partition's end across assignments: that old end must not end a later restore early."""
    topic = unique("changelog")
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    admin.create_topics([NewTopic(topic, 2, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    for key, value, headers in [(b"a", b"state-a", None), (b"b", b"state-b", None),
                                (b"a", None, changelog.tombstone_headers(7))]:
        producer.send(topic, key=key, value=value, partition=0, headers=headers)
    producer.flush()
    written = [(0, b"a", b"state-a", []), (1, b"b", b"state-b", []), (2, b"a", None, changelog.tombstone_headers(7))]
    reader = open_changelog(KafkaConfig(bootstrap_servers=broker.bootstrap, client="confluent"), topic)
    assert isinstance(reader, ConfluentChangelogReader)
    try:
        reader.start({0: 0, 1: 0})
        assert read_until_caught_up(reader, {0, 1}) == {0: written, 1: []}
        reader.stop({1})
        producer.send(topic, key=b"c", value=b"state-c", partition=1)
        producer.flush()
        reader.start({1: 0})
        assert 1 not in reader.caught_up()  # its end of 0, from the first start, is not this restore's
        assert read_until_caught_up(reader, {1}) == {1: [(0, b"c", b"state-c", [])]}
        reader.start({0: 0})  # started again without a stop, as a restore begun anew: from its start
        assert read_until_caught_up(reader, {0}) == {0: written}
        reader.start({0: 2})  # from an offset: a local store's tail
        assert read_until_caught_up(reader, {0}) == {0: written[2:]}
        assert reader.log_start(0) == 0
    finally:
        producer.close()
        reader.close()


def test_a_daemon_on_the_confluent_client_restores_its_state_through_librdkafka(tmp_path, broker, model_dir,
                                                                                 daemon_factory):
    """SIGTERM, then a restart: every key's state comes back from the changelog, read by the confluent
    reader, and every event is predicted at its own step count, as offline, none twice."""
    events = make_events(3_000, 200, seed=23)
    daemon = daemon_factory(kafka__client="confluent")
    prepare(daemon)
    daemon.start()  # ready once its (empty) changelog partitions are restored
    as_messages = [(e["key"].encode(), event_value(e["features"], e["ts"])) for e in events]
    produce(broker, daemon.topic, as_messages[:1_500])
    predictions_by_source(broker, daemon.kafka["output_topic"], 1_500)
    assert daemon.stop() == 0
    again = daemon.replica().start()
    produce(broker, daemon.topic, as_messages[1_500:])
    found = predictions_by_source(broker, daemon.kafka["output_topic"], len(events))
    assert assert_exact(tmp_path, model_dir, events, found) == 0
    assert daemon_metric(again, "streamlstm_restored_keys_total", '{source="changelog"}') == 200
    changelog_topic = StateConfig().changelog_for(KafkaConfig(**daemon.kafka))
    assert f"restores read {changelog_topic} on librdkafka" in again.log_file.read_text()
    assert again.stop() == 0
