"""The trainer's resumable checkpoint: weights, optimiser state and the history, after every epoch.

Everything an epoch depends on is in it or derived from the epoch number (the batch order, the learning
rate), so a run resumed after an interruption ends with exactly the weights of an uninterrupted one. A
fingerprint of the data and settings stops a checkpoint from being resumed by a different run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..config import TrainConfig
from ..errors import UsageError
from ..model.network import ModelSpec
from .data import KeySeries

Weights = dict[str, torch.Tensor]
_PARTS = ("fingerprint", "model", "optimiser", "history")


class CheckpointError(UsageError):
    """The checkpoint cannot be resumed; the message names the file and how to start afresh."""


@dataclass
class History:
    """Per-epoch losses and the weights of the epoch with the lowest validation loss so far."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0
    best_weights: Weights = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        return len(self.train_loss)

    def record(self, train_loss: float, val_loss: float, weights: Weights) -> None:
        """Add an epoch; it becomes the best when its validation loss is lower (or there is none)."""
        self.train_loss.append(train_loss)
        self.val_loss.append(val_loss)
        best = self.val_loss[self.best_epoch - 1] if self.best_epoch else math.inf
        if not (val_loss < best or math.isnan(val_loss)):  # NaN: no validation targets, keep the latest
            return
        self.best_epoch = self.epochs
        self.best_weights = {name: t.detach().clone() for name, t in weights.items()}

    def patience_spent(self, patience: int) -> bool:
        return self.epochs - self.best_epoch >= patience


def fingerprint(spec: ModelSpec, series: list[KeySeries], cfg: TrainConfig) -> str:
    """What a run is: its settings, its spec (with the data's statistics) and every sequence's arrays."""
    digest = hashlib.sha256(json.dumps([asdict(cfg), spec.to_json()], sort_keys=True).encode())
    for s in series:
        for array in (s.inputs, s.targets, s.train, s.valid):
            digest.update(array.tobytes())
    return digest.hexdigest()


class TrainingCheckpoint:
    """One file, replaced atomically after each epoch, so an interruption leaves the last whole epoch."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = path
        self.fingerprint = fingerprint

    def save(self, model: torch.nn.Module, optimiser: torch.optim.Optimizer, history: History) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({"fingerprint": self.fingerprint, "model": model.state_dict(),
                    "optimiser": optimiser.state_dict(), "history": asdict(history)}, tmp)
        os.replace(tmp, self.path)

    def load(self, model: torch.nn.Module, optimiser: torch.optim.Optimizer) -> History | None:
        """Restore model and optimiser from the checkpoint; None when there is none.

        A damaged one (truncated, parts missing, tensors that do not fit) is a CheckpointError naming the
        file: the run cannot be continued exactly, so the user is told to start afresh, not shown a traceback.
        """
        if not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, weights_only=True)
        except Exception as exc:  # torch raises many kinds for a damaged file
            raise self._damaged("is unreadable", exc) from None
        if not isinstance(saved, dict):
            raise self._damaged("is not a training checkpoint", f"it holds a {type(saved).__name__}")
        if missing := [part for part in _PARTS if part not in saved]:
            raise self._damaged("is not a training checkpoint", f"it lacks {', '.join(missing)}")
        if saved["fingerprint"] != self.fingerprint:
            raise CheckpointError(f"train --resume: {self.path} belongs to a run with other data or train.* "
                                  "settings; delete it, or resume with the same data and settings")
        try:
            history = _history(saved["history"])
            model.load_state_dict(saved["model"])
            optimiser.load_state_dict(saved["optimiser"])
            if history.best_epoch:  # loaded into the model when training ends: checked now, not then
                _same_shapes(history.best_weights, model.state_dict())
        except Exception as exc:  # load_state_dict raises many kinds for malformed parts, as torch.load does
            raise self._damaged("is damaged", exc) from None
        return history

    def _damaged(self, problem: str, detail: object) -> CheckpointError:
        """One line: torch's messages can run over several lines, or be empty."""
        text = " ".join(str(detail).split()) or type(detail).__name__
        return CheckpointError(f"train --resume: {self.path} {problem} ({text:.300}); delete it, or train "
                               "without --resume, to start afresh")

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _history(raw: object) -> History:
    """The saved history, checked: a malformed one would otherwise fail an epoch or more later."""
    if not isinstance(raw, dict) or set(raw) != {f.name for f in fields(History)}:
        raise TypeError(f"history is not a mapping of {', '.join(f.name for f in fields(History))}")
    history = History(**raw)
    losses = (history.train_loss, history.val_loss)
    if not all(isinstance(v, list) and all(isinstance(x, float) for x in v) for v in losses) \
            or len(history.train_loss) != len(history.val_loss):
        raise TypeError("history: train_loss and val_loss must be lists of floats, one per epoch")
    if not (isinstance(history.best_epoch, int) and 0 <= history.best_epoch <= history.epochs):
        raise TypeError(f"history: best_epoch {history.best_epoch!r} is not one of the {history.epochs} epochs")
    return history


def _same_shapes(weights: object, expected: Weights) -> None:
    """Names and shapes as the model's, so the best epoch's weights load when training ends."""
    if not (isinstance(weights, dict) and {k: getattr(v, "shape", None) for k, v in weights.items()}
            == {k: v.shape for k, v in expected.items()}):
        raise ValueError("history: best_weights do not fit the model")
