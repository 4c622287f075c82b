"""A shadow model (model.shadow_path) through the broker: stepped on the same events with its own state,
exact against its own model offline across kill -9; promoted by a hot reload of the served model to its
version, its warm state carries on, whatever its hidden size."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import torch
from conftest import daemon_metric, event_value, http_get, make_model, produce, unique, wait_until
from test_config import DOCUMENTED
from test_durable_state import Feeder, assert_exact, make_events, predictions_by_source, prepare

from streamlstm.cli import main
from streamlstm.model.artifact import load_artifact, save_artifact
from streamlstm.model.network import LSTMForecaster, ModelSpec

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


def test_a_shadow_that_cannot_load_or_reads_other_features_stops_startup_naming_model_shadow_path(tmp_path, capsys):
    primary, shadow = make_model(tmp_path / "primary"), make_model(tmp_path / "shadow", hidden_size=8, seed=3)
    spec = ModelSpec("regression", ("load", "temp", "minute"), ("load",), 8, 1, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0),
                     (1.0,), (1.0,))
    save_artifact(LSTMForecaster(spec), tmp_path / "other", {})
    serve = ["serve", "--config", str(DOCUMENTED), "--set", f"model.path={primary}", "--set", "model.device=cpu"]
    for path, words in ((tmp_path / "other", "reads features ['load', 'temp', 'minute']"),
                        (tmp_path / "missing", "is not a directory; set model.shadow_path to")):
        assert main([*serve, "--set", f"model.shadow_path={path}"]) == 2
        stderr = capsys.readouterr().err
        assert "model.shadow_path" in stderr and words in stderr and "Traceback" not in stderr
    assert main([*serve, "--set", f"model.shadow_path={shadow}", "--set", "state.max_resident_keys=5000"]) == 2
    assert "model.shadow_path cannot be combined with state.max_resident_keys" in capsys.readouterr().err
    assert main([*serve, "--set", f"model.shadow_path={shadow}", "--check"]) == 0
    assert json.loads(capsys.readouterr().out)["shadow_version"] == version_of(shadow)


def test_a_promotion_hands_the_shadows_table_over_whole_and_a_rollback_hands_it_back(tmp_path):
    """Every key the shadow holds is written to the primary's changelog at the next checkpoint (changed),
    and a key only the old model held (the shadow started after it) is tombstoned there: the served
    model's state is the shadow's, in memory and after a restart alike. Served away from that version
    again, the shadow goes on from the state it handed over."""
    from streamlstm.config import Config, ModelConfig
    from streamlstm.serving.lane import Lane
    from streamlstm.serving.metrics import Metrics
    from streamlstm.serving.models import Models
    from streamlstm.state.resident import ResidentKeys
    from streamlstm.state.store import LocalStores

    primary, shadow = make_model(tmp_path / "v1"), make_model(tmp_path / "v2", hidden_size=24, seed=1)
    cfg = Config(model=ModelConfig(path=str(primary), shadow_path=str(shadow)))
    v1, v2 = (load_artifact(p) for p in (primary, shadow))
    models = Models(cfg, torch.device("cpu"), Metrics(), v1, v2)
    lanes = []
    for role, artifact in (("primary", v1), ("shadow", v2)):
        predictor, stores = models.predictor(artifact), LocalStores(tmp_path / role, role)
        lane = Lane(role, ResidentKeys(predictor.table, stores, 0, (0, 0, None), artifact.version), stores, role,
                    (0, 0, None), artifact.version)
        models.put(lane, artifact, predictor)
        lanes.append(lane)
    for lane, keys in zip(lanes, ([(0, "old"), (0, "both")], [(0, "both")])):
        rows = lane.table.rows(keys)
        lane.table.stepped(rows)
        lane.table.stamp(rows.numpy(), np.array([7] * len(keys)), np.array([0] * len(keys)))
        lane.table.take_changes(1)
    warm = lanes[1].table
    assert models.swap_primary(v2, *lanes).startswith("taken on from the shadow")
    assert lanes[0].table is warm and lanes[0].version == v2.version and lanes[0].accepts[1] == 24
    changes = warm.take_changes(2)
    assert changes.changed.keys == [(0, "both")] and changes.dropped == [((0, "old"), 7)]
    assert len(lanes[1].table) == 0  # the shadow, now of the served version, is idle
    lanes[0].table.stepped(lanes[0].table.rows([(0, "both")]))  # a step under the promoted model
    assert models.swap_primary(v1, *lanes) == "restarted from zero (the shadow carries the old model's on)"
    assert lanes[1].table is warm and lanes[1].version == v2.version and len(lanes[0].table) == 0
    assert warm.take_changes(3).changed.steps.tolist() == [2]  # rolled back: the shadow goes on from it, warm
