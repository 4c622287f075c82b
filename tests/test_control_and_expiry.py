"""Reset and end control events, and TTL expiry, through the daemon and the real embedded broker."""

from __future__ import annotations

import json

from conftest import daemon_metric, offline_predictions, read_all
from kafka import KafkaProducer

from streamlstm.config import KafkaConfig, StateConfig
from streamlstm.state.changelog import TOMBSTONE_OFFSET

T0 = 1_700_000_000_000


def send(broker, topic: str, events: list[dict], partition: int | None = 0) -> None:
    """Events (with 'key') in order, all to one partition so that they share one stream time."""
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    for e in events:
        body = {k: v for k, v in e.items() if k != "key"}
        producer.send(topic, key=e["key"].encode(), value=json.dumps(body).encode(), partition=partition)
    producer.flush()
    producer.close()


def published(broker, daemon, count: int) -> dict[int, dict]:
    """Predictions by event ts, once there are `count` of them."""
    found: dict[int, dict] = {}

    def enough() -> bool:
        found.update({p["event_ts"]: p for p in map(json.loads, (r.value for r in read_all(
            broker, daemon.kafka["output_topic"])))})
        return len(found) >= count

    daemon.wait_for(enough, 30, f"{count} predictions")
    assert len(found) == count
    return found


def changelog_tombstones(broker, daemon) -> list[str]:
    topic = StateConfig().changelog_for(KafkaConfig(**daemon.kafka))
    return [r.key.decode() for r in read_all(broker, topic)
            if r.value is None and TOMBSTONE_OFFSET in dict(r.headers)]


def assert_matches_offline(tmp_path, model_dir, events: list[dict], found: dict[int, dict]) -> None:
    expected = offline_predictions(tmp_path, model_dir, events)
    for p in found.values():
        want = expected[p["event_ts"]]
        assert (want["key"], want["step"]) == (p["key"], p["step"]), (p, want)
        assert max(abs(a - b) for a, b in zip(p["prediction"], want["prediction"])) <= 1e-5


def test_reset_starts_a_key_over_and_end_drops_it_after_its_prediction(tmp_path, broker, model_dir,
                                                                       daemon_factory):
    daemon = daemon_factory().start()
    f = [[10.0, 20.0, 3], [12.0, 18.0, 4], [9.0, 25.0, 5]]
    events = [
        {"key": "a", "features": f[0], "ts": T0 + 1},
        {"key": "a", "features": f[1], "ts": T0 + 2},
        {"key": "a", "features": f[2], "ts": T0 + 3, "reset": True},  # step 1 again
        {"key": "a", "features": f[0], "ts": T0 + 4},  # step 2
        {"key": "b", "features": f[0], "ts": T0 + 5},
        {"key": "b", "features": f[1], "ts": T0 + 6, "end": True},  # predicted, then dropped
        {"key": "b", "features": f[2], "ts": T0 + 7},  # a new sequence: step 1
        {"key": "c", "features": f[0], "ts": T0 + 8},
        {"key": "c", "reset": True},  # control only: no prediction, state dropped
        {"key": "c", "features": f[1], "ts": T0 + 9},  # step 1
        {"key": "d", "features": f[2], "ts": T0 + 10, "end": True},  # predicted, dropped for good
        {"key": "e", "features": f[2], "ts": T0 + 11},
        {"key": "e", "reset": True},  # control only, nothing after it: dropped for good
    ]
    send(broker, daemon.topic, events[:5])
    published(broker, daemon, 5)  # the end event arrives in a later batch than b's first event
    send(broker, daemon.topic, events[5:])
    found = published(broker, daemon, 11)
    steps = {ts - T0: p["step"] for ts, p in found.items()}
    assert steps == {1: 1, 2: 2, 3: 1, 4: 2, 5: 1, 6: 2, 7: 1, 8: 1, 9: 1, 10: 1, 11: 1}
    assert_matches_offline(tmp_path, model_dir, events, found)
    # b and c started over within one batch, so only d and e leave a tombstone in the changelog
    daemon.wait_for(lambda: sorted(changelog_tombstones(broker, daemon)) == ["d", "e"], 10, "tombstones")
    assert daemon_metric(daemon, "streamlstm_keys_dropped_total", '{reason="end"}') == 2
    assert daemon_metric(daemon, "streamlstm_keys_dropped_total", '{reason="reset"}') == 2
    assert daemon_metric(daemon, "streamlstm_live_keys") == 3  # a, b, c
    assert daemon.stop() == 0


def test_event_time_ttl_restarts_a_key_after_a_long_gap_and_sweeps_idle_keys(tmp_path, broker, model_dir,
                                                                             daemon_factory):
    daemon = daemon_factory(state__ttl_clock="event_time", state__ttl_seconds=10.0).start()
    s = 1000
    events = [
        {"key": "idle", "features": [1.0, 2.0, 3], "ts": T0},
        {"key": "gap", "features": [4.0, 5.0, 6], "ts": T0 + 1},
        {"key": "gap", "features": [7.0, 8.0, 9], "ts": T0 + 5 * s},  # within the TTL: step 2
        {"key": "gap", "features": [1.0, 1.0, 1], "ts": T0 + 20 * s},  # 15 s gap: expired, step 1
        {"key": "clock", "features": [2.0, 2.0, 2], "ts": T0 + 100 * s},  # stream time moves on
    ]
    send(broker, daemon.topic, events)
    found = published(broker, daemon, 5)
    assert [found[e["ts"]]["step"] for e in events if e["key"] == "gap"] == [1, 2, 1]
    # the periodic sweep expires "idle" and "gap" (idle for more than 10 s of stream time)
    daemon.wait_for(lambda: daemon_metric(daemon, "streamlstm_keys_dropped_total", '{reason="expired"}') == 3,
                    10, "the sweep")
    assert sorted(changelog_tombstones(broker, daemon)) == ["gap", "idle"]
    back = {"key": "idle", "features": [1.0, 2.0, 3], "ts": T0 + 101 * s}
    send(broker, daemon.topic, [back])
    again = published(broker, daemon, 6)[back["ts"]]
    assert again["step"] == 1 and again["prediction"] == found[T0]["prediction"]  # zero state, same input
    marked = [{**e, "reset": True} if e["ts"] == T0 + 20 * s else e for e in events]
    assert_matches_offline(tmp_path, model_dir, marked, {k: v for k, v in found.items() if v["key"] != "idle"})
    assert daemon.stop() == 0


def test_processing_time_ttl_expires_an_idle_key_with_a_tombstone(broker, daemon_factory):
    daemon = daemon_factory(state__ttl_seconds=1.0).start()
    send(broker, daemon.topic, [{"key": "p", "features": [1.0, 2.0, 3]}])
    first = published(broker, daemon, 1)
    daemon.wait_for(lambda: daemon_metric(daemon, "streamlstm_keys_dropped_total", '{reason="expired"}') == 1,
                    10, "expiry after a second idle")
    assert daemon_metric(daemon, "streamlstm_live_keys") == 0
    daemon.wait_for(lambda: changelog_tombstones(broker, daemon) == ["p"], 10, "the tombstone")
    send(broker, daemon.topic, [{"key": "p", "features": [1.0, 2.0, 3], "ts": 5}])
    again = published(broker, daemon, 2)[5]
    assert again["step"] == 1 and again["prediction"] == next(iter(first.values()))["prediction"]
    assert daemon.stop() == 0
