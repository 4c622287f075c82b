"""Topic administration: create the daemon's topics where missing, and check the state changelog's shape.

Topics are created with the cluster's default replication factor (`default.replication.factor`; a
request for -1, as Kafka Streams' internal topics since Kafka 3.0): 1 on a development broker, what the
operators chose on a production cluster — never a single copy of the keys' state there by accident.
Kafka only (kafka-python's admin client, whichever client the daemon consumes with).
"""

from __future__ import annotations

import logging

from kafka import KafkaAdminClient
from kafka.errors import TopicAlreadyExistsError

from ..config import KafkaConfig
from .api import TopicError
from .kafka_python import client_settings

log = logging.getLogger(__name__)


def _admin(cfg: KafkaConfig) -> KafkaAdminClient:
    return KafkaAdminClient(bootstrap_servers=cfg.bootstrap_servers, client_id=f"{cfg.client_id}-admin",
                            **client_settings(cfg))


def _create(admin: KafkaAdminClient, topic: str, partitions: int, configs: dict[str, str] | None = None) -> None:
    """Create a topic (with the broker's default replication factor); one created meanwhile is fine."""
    try:
        admin.create_topics({topic: {"num_partitions": partitions, "replication_factor": -1, "configs": configs or {}}})
        log.info("created topic %s with %d partitions", topic, partitions)
    except TopicAlreadyExistsError:
        pass


def ensure_topics(cfg: KafkaConfig) -> None:
    """Create the input, output, shadow (if set) and dead-letter topics where missing."""
    admin = _admin(cfg)
    try:
        missing = {cfg.input_topic, cfg.output_topic, cfg.dlq_topic, cfg.shadow_topic} - {""} - set(admin.list_topics())
        for topic in sorted(missing):
            _create(admin, topic, cfg.topic_partitions)
    finally:
        admin.close()


def ensure_changelog(cfg: KafkaConfig, changelog: str) -> int:
    """Create the compacted state changelog with one partition per input partition; check an existing one.

    Returns the partition count. A changelog with another partition count would put keys' state in the
    wrong partitions, so it stops startup.
    """
    admin = _admin(cfg)
    try:
        counts = {t["name"]: len(t["partitions"]) for t in admin.describe_topics([cfg.input_topic, changelog])
                  if not t.get("error_code")}
        if cfg.input_topic not in counts:
            raise TopicError(f"input topic {cfg.input_topic!r} does not exist; create it, or set "
                             "kafka.create_topics: true")
        partitions = counts[cfg.input_topic]
        if changelog not in counts:
            _create(admin, changelog, partitions, {"cleanup.policy": "compact"})
        elif counts[changelog] != partitions:
            raise TopicError(f"changelog topic {changelog!r} has {counts[changelog]} partitions but input topic "
                             f"{cfg.input_topic!r} has {partitions}; they must match (state follows the input "
                             "partition): recreate the changelog or set state.changelog_topic to a new name")
        return partitions
    finally:
        admin.close()
