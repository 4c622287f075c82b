"""Live accuracy: a regression model scored from the stream itself.

A forecaster's truth arrives on its own input: the prediction published after a key's t-th event
forecasts the target features' values at its (t + train.horizon)-th, so when that event arrives the
forecast is scored, and beside it the naive forecast (the target's value at event t, "no change").
The forecasts awaiting their event live in the state table (StateTable.keep_pending), a ring of
`horizon` per key; a key's ring starts empty when its state starts from zero and wherever its state was
loaded (a restore, a fetch back after eviction, a model swapped in): the forecasts made before are not
kept anywhere else, so they go unscored (README, "Live accuracy").
"""

from __future__ import annotations

import numpy as np

from ..model.artifact import Artifact
from ..model.predictor import step_rounds
from ..state.table import StateTable
from .metrics import Metrics, observe_many


class LiveAccuracy:
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

    @classmethod
    def of(cls, artifact: Artifact, table: StateTable, metrics: Metrics) -> LiveAccuracy | None:
        """For a regression model whose outputs are features of its events (what its trainer makes);
        None otherwise (classification is scored against labels, which the events do not carry)."""
        spec = artifact.spec
        if spec.task != "regression" or not set(spec.outputs) <= set(spec.features):
            return None
        horizon = int(artifact.training.get("config", {}).get("horizon", 1))
        return cls(table, [spec.features.index(o) for o in spec.outputs], spec.outputs, horizon, metrics,
                   artifact.version)

    def score(self, rows: np.ndarray, steps: np.ndarray, features: list[list[float]], predictions: np.ndarray) -> None:
        """Each stepped event (its table row, its key's step count after it, its raw features, its
        prediction) scores the forecast its key made `horizon` steps before, then leaves its own in that
        slot. A key's events in one poll go in order: one step round at a time."""
        pending, since = self.table.pending, self.table.since
        assert pending is not None and since is not None  # keep_pending, in __init__
        k = len(self.columns)
        actual = np.asarray(features, dtype=np.float32)[:, self.columns]
        model_err, naive_err = [], []
        for positions in step_rounds(rows):
            row, step = rows[positions], steps[positions]
            slot = step % self.horizon
            held = pending[row, slot]
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
