"""`kafka.client: confluent`: the daemon on librdkafka keeps every promise it keeps on kafka-python.

Against the real embedded broker, and in the same consumer group as kafka-python daemons: the two
clients must agree on offsets, changelog and partitioning for state to follow a partition between them.
"""

from __future__ import annotations

import pytest
import yaml
from conftest import consume_exactly, daemon_metric, produce, wait_until
from test_durable_state import (
    Feeder,
    assert_exact,
    make_events,
    predictions_by_source,
    prepare,
)

from streamlstm.config import ConfigError, load_config
from streamlstm.transport.clients import DLQ_REASON
from streamlstm.transport.confluent import confluent_settings


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
    assert daemon_metric(group[2], "streamlstm_restored_keys_total") > 0
    assert all(d.stop() == 0 for d in group[1:])
