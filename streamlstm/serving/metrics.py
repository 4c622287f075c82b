"""Prometheus metrics of one daemon, in a registry of their own (tests run several daemons).

Under serve.workers > 1 each worker process writes its values to files in PROMETHEUS_MULTIPROC_DIR
(prometheus-client's multiprocess mode, chosen when it is imported) and the supervising process adds
them up: counters and histograms sum; each gauge says how in its multiprocess_mode, which a single
process ignores. The names are the same in both modes, so dashboards and alerts work with either.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.process_collector import ProcessCollector

# From 100 µs to 10 s: sub-millisecond GPU steps up to a backlog of seconds.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
BATCH_BUCKETS = tuple(float(2**k) for k in range(18))  # 1 .. 131072 keys per step or checkpoint
SIZE_BUCKETS = tuple(float(4**k) for k in range(5, 16))  # 1 KiB .. 1 GiB
# Raw units, 0.001 to 5 000 (1, 2.5, 5 a decade): the mean comes from _sum / _count whatever the scale.
ERROR_BUCKETS = tuple(m * 10.0**e for e in range(-3, 4) for m in (1.0, 2.5, 5.0))
LOG_LOSS_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 35.0)
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
MODEL_LABELS = ("device", "hidden_size", "num_layers", "state_dtype", "task", "version")  # in the order an Info writes them
SHADOW_LABELS = ("hidden_size", "num_layers", "stepping", "version")
DROP_REASONS = ("end", "reset", "expired")
SKIP_REASONS = ("beyond_cut", "incompatible", "unreadable")
RESTORE_SOURCES = ("local", "changelog")  # a local store and the changelog after it; the changelog alone
REFUSAL_REASONS = ("damaged", "owner", "shape", "version", "ahead", "deleted", "served_elsewhere")
RELOAD_RESULTS = ("swapped", "failed")


def multiprocess() -> bool:
    """Whether values go to files shared by the pod's workers (prometheus-client reads the same variable)."""
    return bool(os.environ.get(MULTIPROC_DIR))


class ClearableGauge(Gauge):
    """A labelled Gauge whose clear() also holds across workers.

    prometheus-client cannot remove a series from a worker's file: it would keep its last value, and a
    partition that moved to another worker would be counted twice. So there clear() sets them to 0.
    """

    def clear(self) -> None:
        if not multiprocess():
            super().clear()
            return
        for metric in self.collect():
            for sample in metric.samples:
                self.labels(**sample.labels).set(0)


class ModelInfo(ClearableGauge):
    """streamlstm_model_info{version, ...} 1: an Info's sample, as a Gauge (multiprocess mode has no Info).

    After a hot reload the previous model's series is gone, or 0 once every worker has swapped.
    """

    def info(self, labels: dict[str, str]) -> None:
        self.clear()
        self.labels(**labels).set(1)


class Metrics:
    def __init__(self, rejection_reasons: Iterable[str] = (), output_topics: Iterable[str] = ()) -> None:
        """`rejection_reasons` and `output_topics`: the label values the labelled counters start with, at 0."""
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        self.events_consumed = Counter("streamlstm_events_consumed_total", "Events read from the input topic.",
                                       registry=r)
        self.predictions = Counter("streamlstm_predictions_produced_total",
                                   "Predictions handed to the producer for the output topic.", registry=r)
        self.rejected = Counter("streamlstm_events_rejected_total",
                                "Events sent to the dead-letter topic, by reason.", ["reason"], registry=r)
        self.replaced = Counter("streamlstm_features_replaced_total",
                                "Feature values replaced by their training mean (events.invalid_feature).",
                                registry=r)
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
        self.checkpoint_duration = Histogram(
            "streamlstm_checkpoint_duration_seconds",
            "One checkpoint: changelog records produced, every record acknowledged, offsets committed.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.checkpoint_bytes = Histogram("streamlstm_checkpoint_size_bytes",
                                          "Changelog bytes written by one checkpoint.", buckets=SIZE_BUCKETS,
                                          registry=r)
        self.checkpoint_keys = Histogram("streamlstm_checkpoint_keys", "Keys written by one checkpoint.",
                                         buckets=BATCH_BUCKETS, registry=r)
        self.checkpoints = Counter("streamlstm_checkpoints_total", "Checkpoints that committed offsets.",
                                   registry=r)
        self.restore_duration = Histogram("streamlstm_restore_duration_seconds",
                                          "Rebuilding one partition's keys from its changelog.",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.restored_keys = Counter("streamlstm_restored_keys_total",
                                     "Keys restored, by source: local (a local store, then the changelog after it) "
                                     "or changelog (the whole changelog).", ["source"], registry=r)
        self.restores = Counter("streamlstm_restores_total", "Partition restores finished, by source.", ["source"],
                                registry=r)
        self.restore_replayed = Counter("streamlstm_restore_replayed_records_total",
                                        "Changelog records read by restores, by source.", ["source"], registry=r)
        self.restore_ready = Histogram("streamlstm_restore_ready_seconds",
                                       "From a partition's assignment to its first poll with its state restored.",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.store_refused = Counter(
            "streamlstm_local_store_refused_total",
            "Local stores not used for a restore: damaged (unreadable, failed checksum), owner (another "
            "directory's), shape or version (another model's), ahead (of the committed offset), deleted (the "
            "changelog after it is gone), served_elsewhere (another owner served the partition since).",
            ["reason"], registry=r)
        self.store_bytes = Gauge("streamlstm_local_store_bytes", "Bytes of the local state stores on disk.",
                                 registry=r, multiprocess_mode="livesum")
        self.restore_skipped = Counter(
            "streamlstm_restore_skipped_records_total",
            "Changelog records not restored: beyond_cut (after the committed offset; replayed instead), "
            "incompatible (another model's state shape), unreadable.", ["reason"], registry=r)
        self.restoring = Gauge("streamlstm_restoring_partitions", "Partitions paused while their state is rebuilt.",
                               registry=r, multiprocess_mode="livesum")
        self.rebalances = Counter("streamlstm_rebalances_total", "Partition assignments received.", registry=r)
        self.partitions_lost = Counter("streamlstm_partitions_lost_total",
                                       "Partitions taken away without a chance to commit (group membership lost).",
                                       registry=r)
        self.delivery_failures = Counter(
            "streamlstm_delivery_failures_total",
            "Input partitions whose records the broker refused in a checkpoint, by the topic refused first; "
            "each such partition is redone from its last commit.", ["topic"], registry=r)
        self.stalls = Counter("streamlstm_consumer_stalls_total",
                              "Times no record came for http.stall_timeout_s while assigned partitions had lag "
                              "(then fetched again; a second timeout fails /healthz).", registry=r)
        self.rewinds = Counter("streamlstm_rewinds_total",
                               "Partitions sent back to their last commit, state included, to be redone.",
                               registry=r)
        self.live_keys = Gauge("streamlstm_live_keys", "Keys with state in the table (resident: in memory).",
                               registry=r, multiprocess_mode="livesum")
        self.stored_keys = Gauge("streamlstm_stored_keys", "Keys in the local state stores (counted every 10 s "
                                 "while written).", registry=r, multiprocess_mode="livesum")
        self.evictions = Counter("streamlstm_evicted_keys_total", "Keys evicted from memory to the local stores "
                                 "(state.max_resident_keys).", registry=r)
        self.fetches = Counter("streamlstm_fetched_keys_total", "Keys missing from memory when their event came, by "
                               "result: hit (fetched back) or miss (new: found nowhere).", ["result"], registry=r)
        self.fetch_duration = Histogram("streamlstm_fetch_duration_seconds", "Making one batch's keys resident "
                                        "(evicting and fetching), for batches that missed keys.",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.dropped_keys = Counter("streamlstm_keys_dropped_total",
                                    "Keys whose state was dropped and tombstoned: end, reset (without features), "
                                    "expired (idle longer than state.ttl_seconds).", ["reason"], registry=r)
        self.assigned = Gauge("streamlstm_assigned_partitions", "Input partitions assigned to this consumer.",
                              registry=r, multiprocess_mode="livesum")
        self.lag = ClearableGauge("streamlstm_consumer_lag", "Records behind the end of the partition.",
                                  ["topic", "partition"], registry=r, multiprocess_mode="livesum")
        # Across workers, the oldest: the most stalled worker is the one to alert on.
        self.last_poll = Gauge("streamlstm_last_poll_timestamp_seconds", "When the poll loop last polled.",
                               registry=r, multiprocess_mode="livemin")
        self.model = ModelInfo("streamlstm_model_info", "The model being served.", MODEL_LABELS, registry=r,
                               multiprocess_mode="livemax")
        self.shadow = ModelInfo("streamlstm_shadow_model_info", "The shadow model (model.shadow_path); stepping="
                                "false once it is the served version (promoted).", SHADOW_LABELS, registry=r,
                                multiprocess_mode="livemax")
        self.shadow_predictions = Counter("streamlstm_shadow_predictions_total",
                                          "Events stepped by the shadow model (its predictions go to "
                                          "kafka.shadow_topic where set).", registry=r)
        self.reloads = Counter("streamlstm_model_reloads_total",
                               "Newer artifacts found under model.path: swapped (now serving) or failed (not "
                               "loadable; the previous model keeps serving).", ["result"], registry=r)
        self.forecast_error = Histogram("streamlstm_forecast_abs_error",
                                        "Live accuracy: a regression forecast's absolute error in raw units, once "
                                        "the event it forecast (train.horizon events on) arrives; forecaster="
                                        "naive: the last-value forecast's, for the same events.",
                                        ["version", "forecaster", "output"], buckets=ERROR_BUCKETS, registry=r)
        self.forecasts_scored = Counter("streamlstm_forecasts_scored_total",
                                        "Predictions scored by live accuracy: forecasts against the event they "
                                        "forecast, classes against the event's label.", ["version"], registry=r)
        self.forecast_log_loss = Histogram("streamlstm_forecast_log_loss",
                                           "Live accuracy of a classification model: -log of the probability "
                                           "it gave an event's label.", ["version"], buckets=LOG_LOSS_BUCKETS,
                                           registry=r)
        self.forecasts_correct = Counter("streamlstm_forecasts_correct_total",
                                         "Labelled events whose most probable class was their label.", ["version"],
                                         registry=r)
        self.labels_seen = Counter("streamlstm_labels_total",
                                   "Labelled events by label (the majority-class baseline's counts).",
                                   ["version", "class"], registry=r)
        self.labels_unknown = Counter("streamlstm_labels_unknown_total",
                                      "Labelled events whose label is none of the model's classes (not scored).",
                                      ["version"], registry=r)
        self._start_at_zero(rejection_reasons, output_topics)

    def _start_at_zero(self, rejection_reasons: Iterable[str], output_topics: Iterable[str]) -> None:
        """Every labelled counter's series exists from the start, at 0, as Prometheus' instrumentation
        advice asks: a series born at 1 has no increase to show, so rate() and increase() would miss the
        first rejection or delivery failure (and the DeliveryFailures alert a single one), and dashboards
        would say "no data" where the answer is 0."""
        for counter, values in ((self.rejected, rejection_reasons), (self.dropped_keys, DROP_REASONS),
                                (self.restore_skipped, SKIP_REASONS), (self.reloads, RELOAD_RESULTS),
                                (self.restored_keys, RESTORE_SOURCES), (self.restores, RESTORE_SOURCES),
                                (self.restore_replayed, RESTORE_SOURCES), (self.store_refused, REFUSAL_REASONS),
                                (self.delivery_failures, output_topics), (self.fetches, ("hit", "miss"))):
            for value in values:
                counter.labels(value)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """Histogram.observe for a whole batch at once: one bucket count per bucket, not per value.

    prometheus-client has no batch call and its observe() walks the buckets in Python (a few µs per
    event on the hot path); this adds the same counts to the same values (tests compare the two).
    """
    if not len(values):
        return
    bounds = np.asarray(histogram._upper_bounds)
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    histogram._sum.inc(float(values.sum()))
    for bucket, count in zip(histogram._buckets, counts.tolist()):
        if count:
            bucket.inc(count)
