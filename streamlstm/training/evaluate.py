"""Validation figures: the model as the daemon serves it, next to the naive baseline any model must beat.

Predictions come from `score_events`, the offline reference the daemon's streaming step equals, run over
each key's full history from zero state; only the validation targets are scored.
"""

from __future__ import annotations

import numpy as np

from ..model.artifact import Artifact
from .data import KeySeries, TrainingData
from .reference import score_events

PROBABILITY_FLOOR = 1e-12  # keeps the log-loss finite when a class gets probability 0


def regression_metrics(pred: np.ndarray, actual: np.ndarray, last: np.ndarray) -> dict[str, float]:
    """Model vs the naive last-value forecast, in raw target units: the bar any forecaster must clear."""
    def mae(p: np.ndarray) -> float:
        return float(np.mean(np.abs(p - actual)))

    def rmse(p: np.ndarray) -> float:
        return float(np.sqrt(np.mean((p - actual) ** 2)))

    return {"val_mae": mae(pred), "val_rmse": rmse(pred), "naive_mae": mae(last), "naive_rmse": rmse(last)}


def classification_metrics(prob: np.ndarray, actual: np.ndarray, train_labels: np.ndarray) -> dict[str, float]:
    """Model vs always-the-majority-class (accuracy) and the training class frequencies (log-loss)."""
    prior = np.bincount(train_labels, minlength=prob.shape[1]) / len(train_labels)

    def log_loss(p: np.ndarray) -> float:
        return float(-np.mean(np.log(np.maximum(p[np.arange(len(actual)), actual], PROBABILITY_FLOOR))))

    return {
        "val_accuracy": float(np.mean(prob.argmax(axis=1) == actual)),
        "val_log_loss": log_loss(prob),
        "majority_accuracy": float(np.mean(actual == prior.argmax())),
        "prior_log_loss": log_loss(np.broadcast_to(prior, prob.shape)),
    }


def validation_metrics(
    artifact: Artifact, data: TrainingData, series: list[KeySeries], column: list[int]
) -> dict[str, float]:
    """Score every key's full sequence with the offline reference and compare on the validation targets."""
    predictions, _ = score_events(artifact, data.events)
    rows = [np.asarray(s.positions)[s.valid] for s in series]
    pred = np.concatenate([predictions[r] for r in rows]).astype(np.float64)
    actual = np.concatenate([s.targets[s.valid] for s in series])
    if not len(actual):
        return {}
    if artifact.spec.task == "classification":
        train_labels = np.concatenate([s.targets[s.train] for s in series])
        return classification_metrics(pred, actual, train_labels)
    last = np.concatenate([s.inputs[s.valid][:, column] for s in series]).astype(np.float64)
    return regression_metrics(pred, actual.astype(np.float64), last)
