"""observe_many, the daemon's batch observation of its latency histogram, counts exactly what observing
each value would."""

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from streamlstm.events import REASONS
from streamlstm.serving.metrics import (
    DROP_REASONS,
    LATENCY_BUCKETS,
    RELOAD_RESULTS,
    SKIP_REASONS,
    Metrics,
    observe_many,
)


def samples(histogram: Histogram) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels.get("le", "")): s.value for metric in histogram.collect() for s in metric.samples
            if not s.name.endswith("_created")}


def test_observe_many_counts_as_observing_each_value() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.exponential(0.05, 5000), list(LATENCY_BUCKETS), [0.0, 99.0]])
    one_by_one = Histogram("one", "", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
    for value in values:
        one_by_one.observe(float(value))
    at_once = Histogram("one", "", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
    observe_many(at_once, values[:3000])
    observe_many(at_once, values[3000:])
    observe_many(at_once, np.array([]))
    expected, got = samples(one_by_one), samples(at_once)
    total = ("one_sum", "")
    assert got.pop(total) == pytest.approx(expected.pop(total))
    assert got == expected  # every bucket and the count; values on a bound count in that bound's bucket


def test_every_labelled_counter_starts_at_zero_for_every_label_value() -> None:
    """Born at 1, a series shows no increase: increase() > 0 alerts would miss a single failure."""
    metrics = Metrics(REASONS, ("predictions", "events-dlq", "changelog"))
    values = {(s.name, tuple(s.labels.values())): s.value for family in metrics.registry.collect()
              for s in family.samples if s.name.endswith("_total")}
    expected = {("streamlstm_events_rejected_total", REASONS), ("streamlstm_keys_dropped_total", DROP_REASONS),
                ("streamlstm_restore_skipped_records_total", SKIP_REASONS),
                ("streamlstm_model_reloads_total", RELOAD_RESULTS),
                ("streamlstm_delivery_failures_total", ("predictions", "events-dlq", "changelog"))}
    for name, labels in expected:
        assert all(values[(name, (label,))] == 0 for label in labels), name
