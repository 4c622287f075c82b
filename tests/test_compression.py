"""Compressed batches. Producers compress as they please (`compression.type` is the producer's choice,
and brokers keep it), so the daemon reads input batches in every codec Kafka has; it compresses its own
records — predictions, dead letters, state — with `kafka.compression_type`. Either client."""

from __future__ import annotations

import random

import pytest
from conftest import (
    assert_equals_offline,
    consume_exactly,
    event_value,
    offline_predictions,
    produce,
)

from streamlstm.config import ConfigError, KafkaConfig, load_config
from streamlstm.transport.admin import ensure_topics
from streamlstm.transport.confluent import producer_config
from streamlstm.transport.kafka_python import producer_settings

CODECS = ("gzip", "snappy", "lz4", "zstd")


def test_the_configured_codec_reaches_the_producer_of_either_client():
    zstd = load_config(overrides=["kafka.compression_type=zstd"], environ={}).kafka
    assert producer_settings(zstd)["compression_type"] == "zstd"
    assert producer_config(zstd)["compression.type"] == "zstd"
    default = load_config(environ={}).kafka  # Kafka's default: none
    assert producer_settings(default)["compression_type"] is None
    assert producer_config(default)["compression.type"] == "none"


def test_an_unknown_codec_stops_startup_naming_the_key_and_the_choices():
    with pytest.raises(ConfigError, match="kafka.compression_type: 'brotli' is not one of none, gzip, snappy, lz4, zstd"):
        load_config(overrides=["kafka.compression_type=brotli"], environ={})


def events(first: int, count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"key": f"k{rng.randrange(30)}", "features": [rng.gauss(10, 3), rng.gauss(20, 5), rng.randrange(24)],
             "ts": 1_700_000_000_000 + i} for i in range(first, first + count)]


def produce_in_every_codec(broker, topic: str, batch: list[dict]) -> None:
    """The events in order, a slice uncompressed and a slice in each codec."""
    slices = (None, *CODECS)
    size = -(-len(batch) // len(slices))
    for i, codec in enumerate(slices):
        part = batch[i * size:(i + 1) * size]
        produce(broker, topic, [(e["key"].encode(), event_value(e["features"], e["ts"])) for e in part], codec)


@pytest.mark.parametrize("client,codec", [("kafka-python", "zstd"), ("confluent", "lz4")])
def test_events_in_every_codec_are_predicted_as_offline_and_compressed_state_restores(
        tmp_path, broker, model_dir, daemon_factory, client, codec):
    daemon = daemon_factory(kafka__client=client, kafka__compression_type=codec)
    ensure_topics(KafkaConfig(**daemon.kafka))
    before, after = events(0, 500, seed=1), events(500, 250, seed=2)
    produce_in_every_codec(broker, daemon.topic, before)
    daemon.start()
    consume_exactly(broker, daemon.kafka["output_topic"], len(before))
    assert daemon.stop() == 0  # the last checkpoint writes every key's state, compressed

    successor = daemon.replica().start()  # restores the keys from the compressed changelog
    produce_in_every_codec(broker, daemon.topic, after)
    published = consume_exactly(broker, daemon.kafka["output_topic"], len(before) + len(after))
    seen = assert_equals_offline(published, offline_predictions(tmp_path, model_dir, before + after), daemon.topic)
    assert len(seen) == len(before) + len(after)
    assert successor.stop() == 0
    assert "Traceback" not in daemon.log() + successor.log()
