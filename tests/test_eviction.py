"""state.max_resident_keys against the real embedded broker: with far fewer keys in memory than live
ones, evicted to the local stores and fetched back, every prediction equals `streamlstm predict` over
the key's whole sequence, through a restart in the middle (a restore that keeps only the bound resident)."""

from __future__ import annotations

import random

from conftest import daemon_metric, wait_until
from test_durable_state import BASE_TS, Feeder, assert_exact, predictions_by_source, prepare

RESIDENT, KEYS, EVENTS = 300, 5_000, 10_000


def keyed_events(n: int, keys: int, traffic: str, seed: int) -> list[dict]:
    """Events over `keys` keys, uniform or half of them Zipf(1.1) (a few hot keys, a long tail)."""
    rng = random.Random(seed)

    def key(i: int) -> int:
        return min(int(rng.paretovariate(1.1)) - 1, keys - 1) if traffic == "zipf" and i % 2 else rng.randrange(keys)

    return [{"key": f"k{key(i)}", "features": [round(rng.gauss(10, 3), 3), round(rng.gauss(20, 5), 3), rng.randrange(24)],
             "ts": BASE_TS + i} for i in range(n)]


def test_with_far_fewer_resident_keys_than_live_ones_every_prediction_equals_offline(
        tmp_path, broker, model_dir, daemon_factory):
    """Uniform keys first (nearly every event a miss), then Zipf-skewed ones (hot keys stay resident)."""
    events = keyed_events(EVENTS // 2, KEYS, "uniform", seed=21) + keyed_events(EVENTS // 2, KEYS, "zipf", seed=22)
    for i, event in enumerate(events):
        event["ts"] = BASE_TS + i  # unique: an event's ts identifies it
    daemon = daemon_factory(state__max_resident_keys=RESIDENT, kafka__max_poll_records=RESIDENT // 2,
                            state__checkpoint_interval_ms=500)
    prepare(daemon)
    daemon.start()
    feeder = Feeder(broker.bootstrap, daemon.topic, events, per_second=2_000)
    feeder.start()
    wait_until(lambda: feeder.sent > EVENTS // 2, 30, "half the events sent")
    hits = daemon_metric(daemon, "streamlstm_fetched_keys_total", '{result="hit"}')
    assert daemon.stop() == 0
    daemon.start()  # the same state.dir: the local stores hold the evicted keys
    feeder.join()

    found = predictions_by_source(broker, daemon.kafka["output_topic"], len(events))
    assert_exact(tmp_path, model_dir, events, found)
    assert hits > 100, "keys must have been evicted and fetched back before the restart"
    assert daemon_metric(daemon, "streamlstm_fetched_keys_total", '{result="hit"}') > 100, "and after it"
    assert daemon_metric(daemon, "streamlstm_evicted_keys_total") > 0
    assert daemon_metric(daemon, "streamlstm_live_keys") <= RESIDENT
    assert daemon_metric(daemon, "streamlstm_restores_total", '{source="local"}') == 4
    assert daemon.stop() == 0
