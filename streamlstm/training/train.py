"""The trainer: each key's history from zero state, as the daemon serves it, in truncated-BPTT chunks.

Many keys run side by side in a batch (padded and masked), each from zero state; every
`train.tbptt_steps` events the loss of the chunk takes an optimiser step and h, c carry on, detached,
into the next chunk. So the model learns on states that have seen the whole history before, the regime
the daemon serves in, not on short windows from zero. The last `holdout_events` targets of each key are
held out by time for early stopping, and the final metrics come from `evaluate`, which runs the offline
reference the daemon equals.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from ..config import TrainConfig
from ..errors import UsageError
from ..model.artifact import Artifact, load_artifact, non_finite_tensors, save_artifact
from ..model.network import LSTMForecaster, ModelSpec
from .checkpoint import History, TrainingCheckpoint, fingerprint
from .data import (
    KeySeries,
    TrainingData,
    TrainingDataError,
    key_series,
    model_outputs,
    read_training_data,
    training_part,
)
from .evaluate import validation_metrics
from .progress import ProgressBar


def _stats(values: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and population std per column; a constant column gets std 1 so it normalises to 0."""
    values = values.astype(np.float64)
    std = values.std(axis=0)
    std[std == 0] = 1.0
    return tuple(float(v) for v in values.mean(axis=0)), tuple(float(v) for v in std)


def build_spec(data: TrainingData, series: list[KeySeries], outputs: tuple[str, ...], cfg: TrainConfig) -> ModelSpec:
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
    mask: torch.Tensor  # [keys, time], True where a target of the split sits


def _batch(group: list[KeySeries], spec: ModelSpec, valid: bool) -> Batch:
    """Keys padded to the group's longest; the mask marks the training or the validation targets."""
    mean = np.array(spec.target_mean, dtype=np.float32)
    std = np.array(spec.target_std, dtype=np.float32)
    targets = [s.targets if spec.task == "classification" else (s.targets - mean) / std for s in group]
    return Batch(
        pad_sequence([torch.from_numpy(s.inputs) for s in group], batch_first=True),
        pad_sequence([torch.from_numpy(t) for t in targets], batch_first=True),
        pad_sequence([torch.from_numpy(s.valid if valid else s.train) for s in group], batch_first=True),
    )


def training_batches(series: list[KeySeries], spec: ModelSpec, batch_keys: int, rng: np.random.Generator) -> list[Batch]:
    """Shuffled groups of keys, cut after their last training target (later events teach nothing)."""
    order = rng.permutation(len(series))
    batches = []
    for start in range(0, len(order), batch_keys):
        batch = _batch([series[i] for i in order[start : start + batch_keys]], spec, valid=False)
        steps = batch.mask.any(dim=0).nonzero()
        if len(steps):
            end = int(steps[-1]) + 1
            batches.append(Batch(batch.inputs[:, :end], batch.targets[:, :end], batch.mask[:, :end]))
    return batches


def validation_batches(series: list[KeySeries], spec: ModelSpec, batch_keys: int) -> list[Batch]:
    return [_batch(series[i : i + batch_keys], spec, valid=True) for i in range(0, len(series), batch_keys)]


def _loss(model: LSTMForecaster, out: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked targets: MSE on normalised values, or cross-entropy."""
    if model.spec.task == "classification":
        return nn.functional.cross_entropy(out[mask], targets[mask])
    return nn.functional.mse_loss(out[mask], targets[mask])


def train_batch(model: LSTMForecaster, optimiser: torch.optim.Optimizer, batch: Batch, cfg: TrainConfig) -> tuple[float, int]:
    """Truncated BPTT over one batch: a step per chunk with targets, state carried on detached.

    Returns the summed loss and the number of targets, for the epoch's mean.
    """
    state = None
    total, count = 0.0, 0
    for start in range(0, batch.inputs.shape[1], cfg.tbptt_steps):
        chunk = slice(start, start + cfg.tbptt_steps)
        out, (h, c) = model.run(batch.inputs[:, chunk], state)
        state = (h.detach(), c.detach())
        mask = batch.mask[:, chunk]
        if not mask.any():
            continue
        optimiser.zero_grad()
        loss = _loss(model, out, batch.targets[:, chunk], mask)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimiser.step()
        n = int(mask.sum())
        total += loss.item() * n
        count += n
    return total, count


@torch.no_grad()
def validation_loss(model: LSTMForecaster, batches: list[Batch]) -> float:
    """Mean loss on the validation targets, each key's whole history run from zero state; NaN if none."""
    total, count = 0.0, 0
    for batch in batches:
        n = int(batch.mask.sum())
        if n:
            total += _loss(model, model(batch.inputs), batch.targets, batch.mask).item() * n
            count += n
    return total / count if count else math.nan


def learning_rate(cfg: TrainConfig, epoch: int) -> float:
    """The rate for a (1-based) epoch: constant, or cosine from learning_rate down towards 0."""
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    return cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / cfg.epochs))


def fit(model: LSTMForecaster, series: list[KeySeries], cfg: TrainConfig, checkpoint: TrainingCheckpoint,
        resume: bool, log: Callable[[str], None], bar: ProgressBar) -> History:
    """Epochs until `epochs` or early stopping, checkpointed after each; leaves the best epoch's weights.

    Each epoch's batch order comes from (seed, epoch) and its rate from the epoch number, so nothing but
    the checkpoint is needed to continue a run exactly.
    """
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    history = (checkpoint.load(model, optimiser) if resume else None) or History()
    if history.epochs:
        log(f"train: resuming after epoch {history.epochs} from {checkpoint.path}")
    validation = validation_batches(series, model.spec, cfg.batch_keys)
    every = max(1, cfg.epochs // 10)
    model.train()
    for epoch in range(history.epochs + 1, cfg.epochs + 1):
        if history.patience_spent(cfg.patience):
            bar.close()
            log(f"train: early stop after epoch {history.epochs}: no better validation loss for "
                f"{cfg.patience} epochs (train.patience)")
            break
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(cfg, epoch)
        batches = training_batches(series, model.spec, cfg.batch_keys, np.random.default_rng([cfg.seed, epoch]))
        total, count = 0.0, 0
        for i, batch in enumerate(batches, start=1):
            loss_sum, n = train_batch(model, optimiser, batch, cfg)
            total, count = total + loss_sum, count + n
            bar.update(f"epoch {epoch}/{cfg.epochs}", i, len(batches), total / count)
        model.eval()
        history.record(total / count, validation_loss(model, validation), model.state_dict())
        model.train()
        checkpoint.save(model, optimiser, history)
        if epoch % every == 0 or epoch == cfg.epochs:
            bar.close()
            log(f"train: epoch {epoch}/{cfg.epochs} loss {history.train_loss[-1]:.5f} "
                f"validation {history.val_loss[-1]:.5f}")
    bar.close()
    model.load_state_dict(history.best_weights)
    model.eval()
    return history


class TrainingDiverged(UsageError):
    """The weights went to NaN or infinity: nothing is written, so no daemon can load them."""


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


def checkpoint_path(out: Path) -> Path:
    """Beside the artifact, hidden: a directory of artifacts watched by the daemon never lists it."""
    return out.parent / f".{out.name}.train-checkpoint"


def train(data: str | Path | TrainingData, out: str | Path, cfg: TrainConfig, log: Callable[[str], None] = print,
          progress: TextIO | None = None, resume: bool = False) -> Artifact:
    """Train on a file (JSONL, or CSV by its suffix) or on data already read, write the artifact to `out`
    and return it as loaded from disk.

    Same data and config give the same weights and so the same version: initial weights and key
    shuffling come from `cfg.seed` only, and training runs on one thread whatever the machine. With
    `resume`, a checkpoint left by an interrupted run of the same data and config is continued.
    """
    started = time.perf_counter()
    out = Path(out)
    if not isinstance(data, TrainingData):
        data = read_training_data(data, cfg)
    if data.rejected:
        log(f"train: skipped {sum(data.rejected.values())} rejected events: {dict(sorted(data.rejected.items()))}")
    outputs, column = model_outputs(data, cfg)
    series = key_series(data, outputs, cfg)
    train_targets = sum(int(s.train.sum()) for s in series)
    if not train_targets:
        raise TrainingDataError(f"train: no training targets in {data.source}: every key has at most "
                                f"train.holdout_events={cfg.holdout_events} targets")
    spec = build_spec(data, series, outputs, cfg)
    model = _seeded_model(spec, cfg.seed)
    checkpoint = TrainingCheckpoint(checkpoint_path(out), fingerprint(spec, series, cfg))
    with _one_thread():
        history = fit(model, series, cfg, checkpoint, resume, log, ProgressBar(progress))
        if bad := non_finite_tensors(model.state_dict()):
            raise TrainingDiverged(f"train: the weights diverged to NaN or infinity ({', '.join(bad[:4])}); nothing "
                                   f"written to {out}: lower train.learning_rate (was {cfg.learning_rate}) or set "
                                   f"train.grad_clip (was {cfg.grad_clip})")
        # scored in memory before saving: the metrics go into model.json, and the version ignores them
        metrics = validation_metrics(Artifact(model, "", {}, out), data, series, column)
    best = history.best_epoch - 1
    training = {
        "events": len(data.events), "keys": len({e.key for e in data.events}), "sequences": len(series),
        "rejected": sum(data.rejected.values()), "train_targets": train_targets,
        "validation_targets": sum(int(s.valid.sum()) for s in series), "epochs": history.epochs,
        "best_epoch": history.best_epoch, "seed": cfg.seed, "train_loss": history.train_loss[best],
        "val_loss": history.val_loss[best], **metrics, "config": asdict(cfg),
    }
    version = save_artifact(model, out, training)
    checkpoint.remove()
    log(f"train: {version} in {time.perf_counter() - started:.1f}s; {len(data.events)} events, "
        f"{training['keys']} keys, best epoch {history.best_epoch}/{history.epochs}; "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return load_artifact(out)
