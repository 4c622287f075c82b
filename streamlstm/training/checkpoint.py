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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import TrainConfig
from ..model.network import ModelSpec
from .data import KeySeries, TrainingDataError

Weights = dict[str, torch.Tensor]


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
        """Restore model and optimiser from the checkpoint; None when there is none."""
        if not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, weights_only=True)
        except Exception as exc:  # torch raises many kinds for a damaged file
            raise TrainingDataError(f"train --resume: {self.path} is unreadable ({exc}); delete it to start "
                                    "afresh") from None
        if saved.get("fingerprint") != self.fingerprint:
            raise TrainingDataError(f"train --resume: {self.path} belongs to a run with other data or train.* "
                                    "settings; delete it, or resume with the same data and settings")
        model.load_state_dict(saved["model"])
        optimiser.load_state_dict(saved["optimiser"])
        return History(**saved["history"])

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
