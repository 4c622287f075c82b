"""observe_many, the daemon's batch observation of its latency histogram, counts exactly what observing
each value would."""

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from streamlstm.metrics import LATENCY_BUCKETS, observe_many


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
