"""A shadow model (model.shadow_path) through the broker: stepped on the same events with its own state,
exact against its own model offline across kill -9; promoted by a hot reload of the served model to its
version, its warm state carries on, whatever its hidden size."""

from __future__ import annotations

import shutil
import time

import torch
from conftest import daemon_metric, event_value, http_get, make_model, produce, unique, wait_until
from test_durable_state import Feeder, assert_exact, make_events, predictions_by_source, prepare

from streamlstm.model.artifact import load_artifact

SESSION_MS = 3000  # a killed daemon's partitions come back after half of it


def version_of(model) -> str:
    return load_artifact(model, torch.device("cpu")).version


def working(daemon) -> bool:
    return daemon_metric(daemon, "streamlstm_predictions_produced_total") > 0


def test_the_shadow_steps_every_event_with_its_own_state_exact_across_kill_9(tmp_path, broker, model_dir,
                                                                             daemon_factory):
    shadow = make_model(tmp_path / "shadow", hidden_size=24, seed=1)  # another model, another state shape
    events = make_events(1_500, 150, seed=21)
    daemon = daemon_factory(model__shadow_path=str(shadow), kafka__shadow_topic=unique("shadow-out"),
                            kafka__session_timeout_ms=SESSION_MS)
    prepare(daemon)
    feeder = Feeder(broker.bootstrap, daemon.topic, events, per_second=300)
    daemon.start()
    feeder.start()
    shadowed = 0.0
    for _ in range(2):
        wait_until(lambda: working(daemon), 60, "predictions from this run", daemon.log)
        time.sleep(0.7)
        shadowed += daemon_metric(daemon, "streamlstm_shadow_predictions_total")
        daemon.kill()
        daemon.start()
    feeder.join()
    shadow_found = predictions_by_source(broker, daemon.kafka["shadow_topic"], len(events))
    assert {p["model_version"] for ps in shadow_found.values() for p in ps} == {version_of(shadow)}
    assert_exact(tmp_path, shadow, events, shadow_found)
    assert_exact(tmp_path, model_dir, events, predictions_by_source(broker, daemon.kafka["output_topic"], len(events)))
    assert shadowed > 0
    status, body = http_get(daemon.port, f"/keys/{events[-1]['key']}")
    assert status == 200 and '"shadow": {"model_version": "' + version_of(shadow) in body


def test_promoting_the_shadow_carries_its_warm_state_on_even_with_another_hidden_size(tmp_path, broker,
                                                                                       daemon_factory):
    models = tmp_path / "models"
    primary = make_model(models / "v1")
    shadow = make_model(tmp_path / "candidate", hidden_size=24, seed=1)
    events = make_events(1_200, 100, seed=22)
    first, second, third = events[:500], events[500:900], events[900:]
    daemon = daemon_factory(models, model__shadow_path=str(shadow), model__reload_interval_s=0.2,
                            kafka__session_timeout_ms=SESSION_MS)
    daemon.start()
    out = daemon.kafka["output_topic"]

    def publish(part):
        produce(broker, daemon.topic, [(e["key"].encode(), event_value(e["features"], e["ts"])) for e in part])

    publish(first)
    predictions_by_source(broker, out, len(first))
    shutil.copytree(shadow, models / "v2")  # the newest under model.path: the served model is hot-reloaded to it
    promoted = 'streamlstm_shadow_model_info{hidden_size="24",num_layers="2",stepping="false",version="%s"} 1.0'
    daemon.wait_for(lambda: promoted % version_of(shadow) in http_get(daemon.port, "/metrics")[1], 30,
                    "the shadow promoted")
    publish(second)
    predictions_by_source(broker, out, len(first) + len(second))
    daemon.kill()  # kill -9 after the promotion: the state it took on must survive it
    daemon.start()
    publish(third)
    found = predictions_by_source(broker, out, len(events))

    before = {e["ts"] for e in first}
    assert {p["model_version"] for ts in before for p in found[ts]} == {version_of(primary)}
    assert {p["model_version"] for ts, ps in found.items() if ts not in before for p in ps} == {version_of(shadow)}
    assert_exact(tmp_path, primary, first, {ts: found[ts] for ts in before})
    # after it, every key's steps go on from where they were and equal the shadow's model offline over
    # each key's whole sequence: its state was warm, not zero
    later = set(found) - before
    assert_exact(tmp_path, shadow, events, {ts: found[ts] for ts in later}, predicted=later)
