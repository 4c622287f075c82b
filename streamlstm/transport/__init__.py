"""The Kafka layer: the daemon's Transport on the client `kafka.client` names, and the topics it needs.

Client libraries are imported here only when chosen: confluent-kafka is optional, and kafka-python is
not needed to run on confluent-kafka's Transport.
"""

from __future__ import annotations

from ..config import KafkaConfig
from .api import ChangelogSource, Rebalance, Transport


def open_transport(cfg: KafkaConfig, rebalance: Rebalance) -> Transport:
    """The daemon's consumer and producer. Raises TransportError while the cluster cannot be reached."""
    if cfg.client == "confluent":
        from .confluent import ConfluentTransport

        return ConfluentTransport(cfg, rebalance)
    from .kafka_python import KafkaPythonTransport

    return KafkaPythonTransport(cfg, rebalance)


def open_changelog(cfg: KafkaConfig, topic: str) -> ChangelogSource:
    """A reader of the state changelog `topic`, for restores, on the client `kafka.client` names."""
    if cfg.client == "confluent":
        from .confluent import ConfluentChangelogReader

        return ConfluentChangelogReader(cfg, topic)
    from .readers import ChangelogReader

    return ChangelogReader(cfg, topic)


def prepare_topics(cfg: KafkaConfig, changelogs: list[str]) -> int:
    """Create the topics the daemon needs where missing (the input, output, shadow and dead-letter topics
    only under kafka.create_topics) and check the changelogs' shape; returns the input's partition count.
    Raises TransportError while the cluster cannot be reached, TopicError for topics shaped wrongly."""
    from .admin import ensure_changelog, ensure_topics
    from .kafka_python import translated

    with translated():
        if cfg.create_topics:
            ensure_topics(cfg)
        return min(ensure_changelog(cfg, changelog) for changelog in changelogs)
