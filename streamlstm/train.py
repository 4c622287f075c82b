"""A first, simple trainer: whole per-key histories from zero state, exactly as the daemon serves them.

Each key's events run through `LSTMForecaster.forward` from zero state, so the model is trained in the
regime it is served in (no windows, no carried state). The last `holdout_events` targets of every key
are held out by time, and the validation metrics are computed with `score_events`, the offline
reference, so they describe what the daemon will publish rather than the training forward pass.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from .artifact import Artifact, load_artifact, save_artifact
from .config import TrainConfig
from .events import (
    LABEL_FIELD,
    Event,
    EventDecoder,
    Rejection,
    decode_line,
    read_event_lines,
)
from .model import LSTMForecaster, ModelSpec
from .offline import score_events

PROBABILITY_FLOOR = 1e-12  # keeps the log-loss finite when a class gets probability 0


class TrainingDataError(ValueError):
    """The data (with the train settings) cannot make a model; the message says what is missing."""


@dataclass
class EventFile:
    """The accepted events of a training file, in file order, with their labels and the rejections."""

    features: tuple[str, ...]
    events: list[Event]
    labels: list[str | int | None]
    rejected: Counter[str]


@dataclass
class KeySeries:
    """One key's history as arrays; `train` and `valid` mark which events carry a target of each part.

    `targets` holds raw values [n, outputs] for regression and class indices [n] for classification;
    rows without a target hold zeros and are never read.
    """

    positions: list[int]
    inputs: np.ndarray
    targets: np.ndarray
    train: np.ndarray
    valid: np.ndarray


def feature_names(records: Sequence[Any]) -> tuple[str, ...]:
    """Names from the first record with object features (their order is the model's), else f0..f{n-1}.

    Object features are preferred because they carry names; list features only carry a count.
    """
    features = [r.get("features") for r in records if isinstance(r, dict)]
    for raw in features:
        if isinstance(raw, dict) and raw:
            return tuple(raw)
    for raw in features:
        if isinstance(raw, list) and raw:
            return tuple(f"f{i}" for i in range(len(raw)))
    raise TrainingDataError("train: no line has non-empty 'features' (a list or an object); nothing to train on")


def _label(obj: Any) -> str | int | None | Rejection:
    """A record's label: an int or a string, None when absent; anything else is not a usable class."""
    label = obj.get(LABEL_FIELD)
    if label is None or (isinstance(label, (int, str)) and not isinstance(label, bool)):
        return label
    return Rejection("bad_label", f"'label' must be an int or a string, got {label!r}")


def read_training_events(path: str | Path) -> EventFile:
    """Decode a JSONL event file with the same checks as the wire format, plus an optional 'label'."""
    records = [obj for _, obj in read_event_lines(path)]
    names = feature_names(records)
    decoder = EventDecoder(names)
    events: list[Event] = []
    labels: list[str | int | None] = []
    rejected: Counter[str] = Counter()
    for obj in records:
        event = decode_line(decoder, obj, extra_fields=frozenset({LABEL_FIELD}))
        label = event if isinstance(event, Rejection) else _label(obj)
        if isinstance(label, Rejection):
            rejected[label.reason] += 1
            continue
        events.append(event)
        labels.append(label)
    return EventFile(names, events, labels, rejected)


def class_names(labels: Sequence[str | int | None]) -> tuple[str, ...]:
    """Distinct labels as strings, integers in numeric order before other strings, for a stable order."""
    names = {str(label) for label in labels if label is not None}
    return tuple(sorted(names, key=lambda s: (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)))


def target_indices(features: Sequence[str], targets: Sequence[str]) -> list[int]:
    """Positions of the regression targets among the features; the first feature by default."""
    unknown = [t for t in targets if t not in features]
    if unknown:
        raise TrainingDataError(f"train.targets: {unknown} are not features of the data ({list(features)})")
    return [features.index(t) for t in targets] if targets else [0]


def model_outputs(data: EventFile, cfg: TrainConfig) -> tuple[tuple[str, ...], list[int]]:
    """What the model predicts: the target features and their columns, or the classes (no columns)."""
    if cfg.task == "classification":
        if cfg.targets:
            raise TrainingDataError("train.targets applies to regression only; classification predicts 'label'")
        if not any(label is not None for label in data.labels):
            raise TrainingDataError("train: task is classification but no accepted event has a 'label'")
        return class_names(data.labels), []
    column = target_indices(data.features, cfg.targets)
    return tuple(data.features[i] for i in column), column


def key_series(data: EventFile, outputs: tuple[str, ...], task: str, holdout: int) -> list[KeySeries]:
    """Group events per key (file order is time order), attach each event's target and split by time.

    A regression target is the next event's value of the output features (horizon 1), so a key's last
    event has none; a classification target is the event's own label. The last `holdout` targets of
    each key are validation, the earlier ones training.
    """
    by_key: dict[str, list[int]] = {}
    for i, event in enumerate(data.events):
        by_key.setdefault(event.key, []).append(i)
    column = [data.features.index(o) for o in outputs] if task == "regression" else []
    class_index = {name: i for i, name in enumerate(outputs)}
    series = []
    for positions in by_key.values():
        inputs = np.array([data.events[i].features for i in positions], dtype=np.float32)
        n = len(positions)
        if task == "regression":
            targets = np.zeros((n, len(column)), dtype=np.float32)
            targets[:-1] = inputs[1:, column]
            has_target = np.arange(n) < n - 1
        else:
            labels = [data.labels[i] for i in positions]
            targets = np.array([0 if lab is None else class_index[str(lab)] for lab in labels], dtype=np.int64)
            has_target = np.array([lab is not None for lab in labels])
        valid = has_target & (np.cumsum(has_target[::-1])[::-1] <= holdout)
        series.append(KeySeries(positions, inputs, targets, has_target & ~valid, valid))
    return series


def _stats(values: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and population std per column; a constant column gets std 1 so it normalises to 0."""
    values = values.astype(np.float64)
    std = values.std(axis=0)
    std[std == 0] = 1.0
    return tuple(float(v) for v in values.mean(axis=0)), tuple(float(v) for v in std)


def training_part(s: KeySeries) -> np.ndarray:
    """The events before a key's first validation target: the only ones allowed to shape normalisation."""
    first_valid = np.flatnonzero(s.valid)
    return np.arange(len(s.positions)) < (first_valid[0] if len(first_valid) else len(s.positions))


def build_spec(data: EventFile, series: list[KeySeries], outputs: tuple[str, ...], cfg: TrainConfig) -> ModelSpec:
    """Architecture and normalisation, with statistics from the training part only (no look-ahead)."""
    feature_mean, feature_std = _stats(np.concatenate([s.inputs[training_part(s)] for s in series]))
    target_mean: tuple[float, ...] = ()
    target_std: tuple[float, ...] = ()
    if cfg.task == "regression":
        target_mean, target_std = _stats(np.concatenate([s.targets[s.train] for s in series]))
    return ModelSpec(cfg.task, data.features, outputs, cfg.hidden_size, cfg.num_layers,
                     feature_mean, feature_std, target_mean, target_std)


@dataclass
class Batch:
    inputs: torch.Tensor  # [keys, time, features], raw, zero-padded after each key's end
    targets: torch.Tensor  # normalised values [keys, time, outputs] or class indices [keys, time]
    mask: torch.Tensor  # [keys, time], True where a training target sits


def make_batches(series: list[KeySeries], spec: ModelSpec, batch_keys: int, rng: np.random.Generator) -> list[Batch]:
    """Shuffled groups of keys, padded to the longest key in the group; padding is masked out."""
    order = rng.permutation(len(series))
    mean = np.array(spec.target_mean, dtype=np.float32)
    std = np.array(spec.target_std, dtype=np.float32)
    batches = []
    for start in range(0, len(order), batch_keys):
        group = [series[i] for i in order[start : start + batch_keys]]
        targets = [s.targets if spec.task == "classification" else (s.targets - mean) / std for s in group]
        batches.append(Batch(
            pad_sequence([torch.from_numpy(s.inputs) for s in group], batch_first=True),
            pad_sequence([torch.from_numpy(t) for t in targets], batch_first=True),
            pad_sequence([torch.from_numpy(s.train) for s in group], batch_first=True),
        ))
    return [b for b in batches if b.mask.any()]


def batch_loss(model: LSTMForecaster, batch: Batch) -> torch.Tensor:
    """Mean loss over the batch's training targets: MSE on normalised values, or cross-entropy."""
    out = model(batch.inputs)[batch.mask]
    if model.spec.task == "classification":
        return nn.functional.cross_entropy(out, batch.targets[batch.mask])
    return nn.functional.mse_loss(out, batch.targets[batch.mask])


def fit(model: LSTMForecaster, series: list[KeySeries], cfg: TrainConfig, log: Callable[[str], None]) -> float:
    """Adam with gradient clipping over shuffled key batches; returns the last epoch's mean loss."""
    rng = np.random.default_rng(cfg.seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    every = max(1, cfg.epochs // 10)
    loss_mean = math.nan
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        total, count = 0.0, 0
        for batch in make_batches(series, model.spec, cfg.batch_keys, rng):
            optimiser.zero_grad()
            loss = batch_loss(model, batch)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimiser.step()
            n = int(batch.mask.sum())
            total += loss.item() * n
            count += n
        loss_mean = total / count
        if epoch % every == 0 or epoch == cfg.epochs:
            log(f"train: epoch {epoch}/{cfg.epochs} loss {loss_mean:.5f}")
    model.eval()
    return loss_mean


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
    artifact: Artifact, data: EventFile, series: list[KeySeries], column: list[int]
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


@contextmanager
def _one_thread() -> Iterator[None]:
    """Train on one intra-op thread, restoring the caller's count afterwards.

    Float sums split over threads round differently with the thread count, so without this the weights
    (and the version, and the metrics) would depend on the machine's cores; for these small per-timestep
    matrix products one thread is also faster than two.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _seeded_model(spec: ModelSpec, seed: int) -> LSTMForecaster:
    """Initial weights from `seed` alone, without disturbing the caller's global torch RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LSTMForecaster(spec)


def train(data: str | Path, out: str | Path, cfg: TrainConfig, log: Callable[[str], None] = print) -> Artifact:
    """Train on a JSONL event file, write the artifact to `out` and return it as loaded from disk.

    Same data and config give the same weights and so the same version: initial weights and key
    shuffling come from `cfg.seed` only, and training runs on one thread whatever the machine.
    """
    started = time.perf_counter()
    events = read_training_events(data)
    if events.rejected:
        log(f"train: skipped {sum(events.rejected.values())} rejected lines: {dict(sorted(events.rejected.items()))}")
    outputs, column = model_outputs(events, cfg)
    series = key_series(events, outputs, cfg.task, cfg.holdout_events)
    train_targets = sum(int(s.train.sum()) for s in series)
    if not train_targets:
        raise TrainingDataError(f"train: no training targets in {data}: every key has at most "
                         f"train.holdout_events={cfg.holdout_events} targets")
    spec = build_spec(events, series, outputs, cfg)
    model = _seeded_model(spec, cfg.seed)
    with _one_thread():
        loss = fit(model, series, cfg, log)
        # scored in memory before saving: the metrics go into model.json, and the version ignores them
        metrics = validation_metrics(Artifact(model, "", {}, Path(out)), events, series, column)
    training = {
        "events": len(events.events), "keys": len(series), "rejected": sum(events.rejected.values()),
        "train_targets": train_targets, "validation_targets": sum(int(s.valid.sum()) for s in series),
        "epochs": cfg.epochs, "seed": cfg.seed, "train_loss": loss, **metrics, "config": asdict(cfg),
    }
    version = save_artifact(model, out, training)
    log(f"train: {version} in {time.perf_counter() - started:.1f}s; {len(events.events)} events, "
        f"{len(series)} keys, train loss {loss:.5f}; " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return load_artifact(out)

