"""Live accuracy: the served model scored from the stream itself.

Regression: a forecaster's truth arrives on its own input. The prediction published after a key's t-th
event forecasts the target features' values at its (t + train.horizon)-th, so when that event arrives
the forecast is scored, and beside it the naive forecast (the target's value at event t, "no change").
The forecasts awaiting their event live in the state table (StateTable.keep_pending), a ring of
`horizon` per key; a key's ring starts empty when its state starts from zero and wherever its state was
loaded (a restore, a fetch back after eviction, a model swapped in): the forecasts made before are not
kept anywhere else, so they go unscored (README, "Live accuracy").

Classification: an event that carries a `label` scores the prediction made for it (the trainer's
target is the event's own label): log-loss, whether the most probable class was right, and the labels
seen per class, from which the majority-class baseline follows.
"""

from __future__ import annotations

import numpy as np

from ..events import Event
from ..model.artifact import Artifact
from ..model.predictor import step_rounds
from ..state.table import StateTable
from .metrics import Metrics, observe_many


class ForecastAccuracy:
    def __init__(self, table: StateTable, columns: list[int], outputs: tuple[str, ...], horizon: int,
                 metrics: Metrics, version: str) -> None:
        self.table = table
        self.columns = columns  # each output's feature column: where its realized value arrives
        self.horizon = horizon
        table.keep_pending(horizon, 2 * len(columns))  # per slot: the forecasts, then the values then
        errors = metrics.forecast_error
        self.errors = [(errors.labels(version, "model", name), errors.labels(version, "naive", name))
                       for name in outputs]
        self.scored = metrics.forecasts_scored.labels(version)

    def score(self, rows: np.ndarray, steps: np.ndarray, events: list[Event], predictions: np.ndarray) -> None:
        """Each stepped event (its table row, its key's step count after it, the event, its prediction)
        scores the forecast its key made `horizon` steps before, then leaves its own in that
        slot. A key's events in one poll go in order: one step round at a time."""
        pending, since = self.table.pending, self.table.since
        assert pending is not None and since is not None  # keep_pending, in __init__
        k = len(self.columns)
        actual = np.asarray([e.features for e in events], dtype=np.float32)[:, self.columns]
        model_err, naive_err = [], []
        for positions in step_rounds(rows):
            row, step = rows[positions], steps[positions]
            slot = step % self.horizon
            held = pending[row, slot]
            # `since` as the step left it: a restored key reset in this poll reads 0 for its events before the
            # reset too, which could score one of them against a slot from before the restore (rare; README)
            due = step - self.horizon > since[row]
            outcome = actual[positions][due].astype(np.float64)
            model_err.append(np.abs(held[due, :k] - outcome))
            naive_err.append(np.abs(held[due, k:] - outcome))
            pending[row, slot] = np.concatenate([predictions[positions], actual[positions]], axis=1)
        model, naive = np.concatenate(model_err), np.concatenate(naive_err)
        for i, (model_hist, naive_hist) in enumerate(self.errors):
            observe_many(model_hist, model[:, i])
            observe_many(naive_hist, naive[:, i])
        self.scored.inc(len(model))


class LabelAccuracy:
    def __init__(self, classes: tuple[str, ...], metrics: Metrics, version: str) -> None:
        self.index = {name: i for i, name in enumerate(classes)}
        self.log_loss = metrics.forecast_log_loss.labels(version)
        self.correct = metrics.forecasts_correct.labels(version)
        self.scored = metrics.forecasts_scored.labels(version)
        self.unknown = metrics.labels_unknown.labels(version)
        self.labels = [metrics.labels_seen.labels(version, name) for name in classes]

    def score(self, rows: np.ndarray, steps: np.ndarray, events: list[Event], predictions: np.ndarray) -> None:
        """Each stepped event with a label of one of the model's classes scores its own prediction."""
        labelled = [(i, self.index.get(str(e.label))) for i, e in enumerate(events) if e.label is not None]
        known = [(i, c) for i, c in labelled if c is not None]
        self.unknown.inc(len(labelled) - len(known))
        if not known:
            return
        at, classes = (np.array(v, dtype=np.int64) for v in zip(*known))
        probabilities = predictions[at].astype(np.float64)
        observe_many(self.log_loss, -np.log(np.maximum(probabilities[np.arange(len(at)), classes], MIN_PROBABILITY)))
        self.correct.inc(int((probabilities.argmax(axis=1) == classes).sum()))
        self.scored.inc(len(at))
        for c, count in enumerate(np.bincount(classes, minlength=len(self.labels)).tolist()):
            if count:
                self.labels[c].inc(count)


MIN_PROBABILITY = 1e-15  # a class given probability 0 costs -log(1e-15) = 34.5, not infinity


def live_accuracy(artifact: Artifact, table: StateTable, metrics: Metrics) -> ForecastAccuracy | LabelAccuracy | None:
    """The scorer for the model: its forecasts (a regression model whose outputs are features of its
    events, as its trainer makes them), or its classes against labels; None for a regression model
    whose outputs its events do not carry."""
    spec = artifact.spec
    if spec.task == "classification":
        return LabelAccuracy(spec.outputs, metrics, artifact.version)
    if not set(spec.outputs) <= set(spec.features):
        return None
    horizon = int(artifact.training.get("config", {}).get("horizon", 1))
    return ForecastAccuracy(table, [spec.features.index(o) for o in spec.outputs], spec.outputs, horizon, metrics,
                            artifact.version)
