"""Live accuracy: each regression forecast scored against the event it forecast (train.horizon events
later in its key's sequence), beside the naive last-value forecast, and each labelled event's class
probabilities against its label, with sums and counts equal to an offline computation over the same
events: `streamlstm predict`'s predictions and the scoring below, written from the definition and
sharing no code with the daemon's."""

from __future__ import annotations

import json
import random
from collections import defaultdict

import numpy as np
import pytest
import torch

from conftest import http_get, make_model, metric, offline_predictions, produce
from streamlstm.events import Event
from streamlstm.model.artifact import load_artifact
from streamlstm.model.predictor import StreamingPredictor
from streamlstm.serving.accuracy import ForecastAccuracy, live_accuracy
from streamlstm.serving.metrics import Metrics
from streamlstm.training.reference import score_events
from test_durable_state import predictions_by_source, prepare

CPU = torch.device("cpu")


def offline_scores(keys: list[str], values: list[float], predictions: list[float], resets: list[bool],
                   horizon: int) -> tuple[list[float], list[float]]:
    """(model errors, naive errors): per key sequence (starting over at a reset), the prediction after
    its t-th event against the value at its (t + horizon)-th, and the value at t against it too."""
    sequences: dict[str, list[int]] = defaultdict(list)
    model, naive = [], []
    for i, key in enumerate(keys):
        if resets[i]:
            sequences[key] = []
        sequences[key].append(i)
        seq = sequences[key]
        if len(seq) > horizon:
            then = seq[-1 - horizon]
            actual = float(np.float32(values[i]))
            model.append(abs(float(np.float32(predictions[then])) - actual))
            naive.append(abs(float(np.float32(values[then])) - actual))
    return model, naive


def histogram(registry_text: str, version: str, forecaster: str) -> tuple[float, float]:
    labels = f'{{forecaster="{forecaster}",output="load",version="{version}"}}'
    return (metric(registry_text, "streamlstm_forecast_abs_error_sum", labels),
            metric(registry_text, "streamlstm_forecast_abs_error_count", labels))


def assert_scores(text: str, version: str, model: list[float], naive: list[float]) -> None:
    assert metric(text, "streamlstm_forecasts_scored_total", f'{{version="{version}"}}') == len(model)
    for forecaster, errors in (("model", model), ("naive", naive)):
        total, count = histogram(text, version, forecaster)
        assert count == len(errors)
        # predictions equal offline's within 1e-5 (another matmul order), so the sums within n * 1e-5
        assert total == pytest.approx(sum(errors), abs=1e-5 * len(errors) + 1e-9)
    assert sum(model) != pytest.approx(sum(naive), rel=1e-3), "the two forecasters must be told apart"


@pytest.mark.parametrize("horizon", [1, 3])
def test_live_scores_equal_offline_scoring_with_repeated_keys_and_resets(tmp_path, horizon):
    """In polls where a key comes several times (its events scored in order) and some keys start over."""
    model = make_model(tmp_path / "model", horizon=horizon)
    artifact = load_artifact(model)
    rng = random.Random(horizon)
    events = [Event(f"k{rng.randrange(30)}", [rng.gauss(10, 3), rng.gauss(20, 5), rng.randrange(24)], None,
                    reset=rng.random() < 0.02) for _ in range(3_000)]
    predictor = StreamingPredictor(artifact, CPU)
    metrics = Metrics()
    accuracy = live_accuracy(artifact, predictor.table, metrics)
    assert isinstance(accuracy, ForecastAccuracy) and accuracy.horizon == horizon
    i = 0
    while i < len(events):
        chunk = events[i:i + rng.randrange(1, 250)]
        i += len(chunk)
        result = predictor.advance([(0, e.key) for e in chunk], [e.features for e in chunk],
                                   np.array([e.reset for e in chunk]))
        accuracy.score(result.rows, result.steps, chunk, result.predictions)
    expected, _ = score_events(artifact, events)
    model_err, naive_err = offline_scores([e.key for e in events], [e.features[0] for e in events],
                                          expected[:, 0].tolist(), [e.reset for e in events], horizon)
    assert len(model_err) > 2_000
    assert_scores(metrics.exposition().decode(), artifact.version, model_err, naive_err)


def served_metrics(broker, daemon, events: list[dict]) -> str:
    """The daemon's /metrics once it has published a prediction for each of the events (keyed records)."""
    prepare(daemon)
    daemon.start()
    produce(broker, daemon.topic, [(e["key"].encode(), json.dumps({k: v for k, v in e.items() if k != "key"}).encode())
                                   for e in events])
    predictions_by_source(broker, daemon.kafka["output_topic"], len(events))
    text = http_get(daemon.port, "/metrics")[1]
    assert daemon.stop() == 0
    return text


def test_a_daemon_scores_its_forecasts_live_as_offline_scoring_does(tmp_path, broker, daemon_factory):
    """Through the broker, horizon 2: the daemon's /metrics against predict's predictions scored offline."""
    model = make_model(tmp_path / "model", horizon=2)
    rng = random.Random(4)
    events = [{"key": f"k{rng.randrange(60)}", "features": [round(rng.gauss(10, 3), 3), round(rng.gauss(20, 5), 3),
                                                           rng.randrange(24)], "ts": 1_700_000_000_000 + i,
               **({"reset": True} if rng.random() < 0.02 else {})} for i in range(2_000)]
    text = served_metrics(broker, daemon_factory(model), events)
    expected = offline_predictions(tmp_path, model, events)
    version = load_artifact(model).version
    model_err, naive_err = offline_scores([e["key"] for e in events], [e["features"][0] for e in events],
                                          [expected[e["ts"]]["prediction"][0] for e in events],
                                          [e.get("reset", False) for e in events], 2)
    assert_scores(text, version, model_err, naive_err)


CLASSES = ("low", "mid", "high")


def offline_label_scores(labels: list, probabilities: list[list[float]]) -> dict:
    """Per labelled event of a known class: -log p(label), whether the most probable class is it."""
    known = [(CLASSES.index(str(label)), p) for label, p in zip(labels, probabilities) if str(label) in CLASSES]
    return {"log_loss": [-float(np.log(max(float(np.float32(p[c])), 1e-15))) for c, p in known],
            "correct": sum(int(np.argmax(p)) == c for c, p in known),
            "counts": {name: sum(c == i for c, _ in known) for i, name in enumerate(CLASSES)},
            "unknown": sum(label is not None for label in labels) - len(known)}


def assert_label_scores(text: str, version: str, expected: dict) -> None:
    v = f'{{version="{version}"}}'
    assert metric(text, "streamlstm_forecast_log_loss_count", v) == len(expected["log_loss"])
    assert metric(text, "streamlstm_forecast_log_loss_sum", v) == pytest.approx(sum(expected["log_loss"]), rel=1e-5)
    assert metric(text, "streamlstm_forecasts_scored_total", v) == len(expected["log_loss"])
    assert metric(text, "streamlstm_forecasts_correct_total", v) == expected["correct"]
    assert metric(text, "streamlstm_labels_unknown_total", v) == expected["unknown"] > 0
    for name, count in expected["counts"].items():
        assert metric(text, "streamlstm_labels_total", f'{{class="{name}",version="{version}"}}') == count > 0


def labelled_events(n: int, seed: int) -> list[dict]:
    """Most events labelled (one label in twenty of no class of the model), some not."""
    rng = random.Random(seed)
    events = []
    for i in range(n):
        event = {"key": f"k{rng.randrange(40)}", "features": [round(rng.gauss(10, 3), 3), round(rng.gauss(20, 5), 3),
                                                              rng.randrange(24)], "ts": 1_700_000_000_000 + i}
        if rng.random() < 0.8:
            event["label"] = "other" if rng.random() < 0.05 else rng.choice(CLASSES)
        events.append(event)
    return events


def test_a_classification_model_is_scored_against_the_labels_events_carry(tmp_path):
    artifact = load_artifact(make_model(tmp_path / "c", task="classification"))
    events = labelled_events(1_500, seed=2)
    decoded = [Event(e["key"], e["features"], None, label=e.get("label")) for e in events]
    predictor, metrics = StreamingPredictor(artifact, CPU), Metrics()
    accuracy = live_accuracy(artifact, predictor.table, metrics)
    assert accuracy is not None
    for i in range(0, len(decoded), 97):
        chunk = decoded[i:i + 97]
        result = predictor.advance([(0, e.key) for e in chunk], [e.features for e in chunk])
        accuracy.score(result.rows, result.steps, chunk, result.predictions)
    expected, _ = score_events(artifact, decoded)
    assert_label_scores(metrics.exposition().decode(), artifact.version,
                        offline_label_scores([e.get("label") for e in events], expected.tolist()))




def test_a_daemon_scores_a_classification_model_against_labels_as_offline_scoring_does(tmp_path, broker,
                                                                                         daemon_factory):
    model = make_model(tmp_path / "c", task="classification")
    events = labelled_events(1_500, seed=3)
    text = served_metrics(broker, daemon_factory(model), events)
    expected = offline_predictions(tmp_path, model, events)
    assert_label_scores(text, load_artifact(model).version, offline_label_scores(
        [e.get("label") for e in events], [expected[e["ts"]]["prediction"] for e in events]))
