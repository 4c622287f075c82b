"""Prometheus metrics of one daemon, in a registry of their own (tests run several daemons)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import generate_latest
from prometheus_client.process_collector import ProcessCollector

# From 100 µs to 10 s: sub-millisecond GPU steps up to a backlog of seconds.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
BATCH_BUCKETS = tuple(float(2**k) for k in range(15))  # 1 .. 16384 keys per step


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        self.events_consumed = Counter("streamlstm_events_consumed_total", "Events read from the input topic.",
                                       registry=r)
        self.predictions = Counter("streamlstm_predictions_produced_total",
                                   "Predictions handed to the producer for the output topic.", registry=r)
        self.rejected = Counter("streamlstm_events_rejected_total",
                                "Events sent to the dead-letter topic, by reason.", ["reason"], registry=r)
        self.latency = Histogram("streamlstm_prediction_latency_seconds",
                                 "Event timestamp (Kafka record time) to its prediction being sent.",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.step_duration = Histogram("streamlstm_step_duration_seconds",
                                       "Wall time of one batched LSTM step (gather, cell, scatter).",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.poll_records = Histogram("streamlstm_poll_records", "Records returned by one non-empty poll.",
                                      buckets=BATCH_BUCKETS, registry=r)
        self.step_batch = Histogram("streamlstm_step_batch_size", "Keys advanced together in one step.",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.commit_duration = Histogram("streamlstm_commit_duration_seconds",
                                         "Producer flush plus offset commit.", buckets=LATENCY_BUCKETS, registry=r)
        self.commits = Counter("streamlstm_commits_total", "Offset commits.", registry=r)
        self.rebalances = Counter("streamlstm_rebalances_total", "Partition assignments received.", registry=r)
        self.live_keys = Gauge("streamlstm_live_keys", "Keys with state in the table.", registry=r)
        self.assigned = Gauge("streamlstm_assigned_partitions", "Input partitions assigned to this consumer.",
                              registry=r)
        self.lag = Gauge("streamlstm_consumer_lag", "Records behind the end of the partition.",
                         ["topic", "partition"], registry=r)
        self.last_poll = Gauge("streamlstm_last_poll_timestamp_seconds", "When the poll loop last polled.",
                               registry=r)
        self.model = Info("streamlstm_model", "The model being served.", registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
