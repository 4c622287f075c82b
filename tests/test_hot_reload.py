"""Hot reload: a newer artifact under model.path is swapped in between two steps while events flow.

No event is lost; every prediction names the model that made it; those made before the swap equal the
old model offline; after it the keys carry their state on, or start from zero when the policy or a new
state shape says so. An artifact that does not load is reported and the old model keeps serving.
"""

import json
import os
import threading

import pytest
from conftest import (
    http_get,
    make_model,
    metric,
    offline_predictions,
    read_all,
    wait_until,
)
from kafka import KafkaProducer

from streamlstm.model.artifact import WEIGHTS_FILE, load_artifact

KEYS = 20


class Flow:
    """Events for KEYS keys at a steady pace on a thread of its own, each with a unique ts."""

    def __init__(self, bootstrap: str, topic: str, per_second: float = 300) -> None:
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
        self.topic, self.pause = topic, 1 / per_second
        self.sent: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            i = len(self.sent)
            event = {"key": f"k{i % KEYS}", "features": [i % 7, i % 5, i % 24], "ts": 1_000_000 + i}
            self.producer.send(self.topic, key=event["key"].encode(),
                               value=json.dumps({"features": event["features"], "ts": event["ts"]}).encode())
            self.sent.append(event)
            self._stop.wait(self.pause)

    def __enter__(self) -> "Flow":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.producer.flush()
        self.producer.close()


def published(daemon) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for record in read_all(daemon.broker, daemon.kafka["output_topic"], 10):
        p = json.loads(record.value)
        out.setdefault(p["event_ts"], []).append(p)
    return out


def reloads(daemon, result: str) -> float:
    text = http_get(daemon.port, "/metrics")[1]
    name = f'streamlstm_model_reloads_total{{result="{result}"}}'
    return metric(text, name) if name in text else 0.0


def drop_in(models, name: str, **model_args) -> str:
    """Publish an artifact the way the trainer does: written elsewhere, renamed into the watched folder."""
    staged = make_model(models.parent / f"staging-{name}", **model_args)
    os.rename(staged, models / name)
    return load_artifact(models / name).version


def serve_through_a_swap(tmp_path, daemon_factory, on_reload: str, **new_model):
    """v1 serves; v2 is dropped in mid-stream, then a corrupt v3. Returns daemon, versions, events, published."""
    models = tmp_path / "models"
    models.mkdir()
    v1 = drop_in(models, "v1", seed=0)
    daemon = daemon_factory(models, model__reload_interval_s=0.2, model__on_reload=on_reload).start()
    with Flow(daemon.broker.bootstrap, daemon.topic) as flow:
        daemon.wait_for(lambda: len(published(daemon)) >= 300, 60, "predictions by v1")
        v2 = drop_in(models, "v2", seed=1, **new_model)
        daemon.wait_for(lambda: reloads(daemon, "swapped") == 1, 30, "v2 swapped in")
        daemon.wait_for(lambda: sum(p[0]["model_version"] == v2 for p in published(daemon).values()) >= 300, 60,
                        "predictions by v2")
        staged = make_model(tmp_path / "staging-v3", seed=2)
        (staged / WEIGHTS_FILE).write_bytes((staged / WEIGHTS_FILE).read_bytes()[:64])  # truncated
        os.rename(staged, models / "v3")
        daemon.wait_for(lambda: reloads(daemon, "failed") == 1, 30, "the corrupt v3 reported")
        served_after_failure = len(flow.sent) + 100
        wait_until(lambda: len(flow.sent) >= served_after_failure, 30, "more events after the failure")
    events = flow.sent
    wait_until(lambda: len(published(daemon)) == len(events), 60, "every event predicted", daemon.log)
    return daemon, v1, v2, events, published(daemon)


def check_before_the_swap(tmp_path, daemon, v1, v2, events, out) -> list[dict]:
    """Exactly one prediction per event; per key v1 then v2; v1's equal v1 offline. Returns v2's events."""
    assert all(len(p) == 1 for p in out.values()), "an event predicted twice"
    by_key: dict[str, list[str]] = {}
    for e in events:
        by_key.setdefault(e["key"], []).append(out[e["ts"]][0]["model_version"])
    for versions in by_key.values():
        switch = versions.index(v2) if v2 in versions else len(versions)
        assert set(versions[:switch]) <= {v1} and set(versions[switch:]) <= {v2}, "v1 after v2 for a key"
    offline = offline_predictions(tmp_path, daemon.model / "v1", events)
    for e in events:
        p = out[e["ts"]][0]
        if p["model_version"] == v1:
            assert p["step"] == offline[e["ts"]]["step"]
            assert max(abs(a - b) for a, b in zip(p["prediction"], offline[e["ts"]]["prediction"])) < 1e-5
    assert "Traceback" not in daemon.log() and "model reload failed" in daemon.log()
    assert daemon.stop() == 0
    return [e for e in events if out[e["ts"]][0]["model_version"] == v2]


def test_a_new_model_is_swapped_in_under_load_and_keeps_the_keys_state(tmp_path, daemon_factory):
    daemon, v1, v2, events, out = serve_through_a_swap(tmp_path, daemon_factory, "keep_state")
    after = check_before_the_swap(tmp_path, daemon, v1, v2, events, out)
    steps = {e["ts"]: i + 1 for i, e in enumerate(e for e in events if e["key"] == "k0")}
    assert all(out[e["ts"]][0]["step"] == steps[e["ts"]] for e in after if e["key"] == "k0"), "state carried on"


@pytest.mark.parametrize("on_reload,new_model", [("reset_state", {}), ("keep_state", {"hidden_size": 8})],
                         ids=["reset_state", "keep_state-but-another-shape"])
def test_a_new_model_that_cannot_keep_the_state_starts_every_key_from_zero(tmp_path, daemon_factory, on_reload,
                                                                            new_model):
    daemon, v1, v2, events, out = serve_through_a_swap(tmp_path, daemon_factory, on_reload, **new_model)
    after = check_before_the_swap(tmp_path, daemon, v1, v2, events, out)
    offline = offline_predictions(tmp_path, daemon.model / "v2", after)  # v2 over each key from its swap on
    for e in after:
        p = out[e["ts"]][0]
        assert p["step"] == offline[e["ts"]]["step"]
        assert max(abs(a - b) for a, b in zip(p["prediction"], offline[e["ts"]]["prediction"])) < 1e-5
