"""The forecaster: nn.LSTM and a linear head, plus the description that travels with its weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

TASKS = ("regression", "classification")
State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each [layers, keys, hidden]


@dataclass(frozen=True)
class ModelSpec:
    """Everything besides the weights that is needed to turn raw features into published predictions.

    Regression outputs are next-event values of `outputs` (feature names) in raw units; classification
    outputs are probabilities of the classes named in `outputs`.
    """

    task: str
    features: tuple[str, ...]
    outputs: tuple[str, ...]
    hidden_size: int
    num_layers: int
    feature_mean: tuple[float, ...]
    feature_std: tuple[float, ...]
    target_mean: tuple[float, ...] = ()
    target_std: tuple[float, ...] = ()

    @property
    def input_size(self) -> int:
        return len(self.features)

    @property
    def output_size(self) -> int:
        return len(self.outputs)

    def to_json(self) -> dict:
        return asdict(self)


class LSTMForecaster(nn.Module):
    """nn.LSTM (batch_first) over normalised features, a linear head on the top layer's output."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.lstm = nn.LSTM(spec.input_size, spec.hidden_size, spec.num_layers, batch_first=True)
        self.head = nn.Linear(spec.hidden_size, spec.output_size)
        self.register_buffer("feature_mean", torch.tensor(spec.feature_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("feature_std", torch.tensor(spec.feature_std, dtype=torch.float32), persistent=False)
        targets = spec.target_mean or (0.0,) * spec.output_size
        scales = spec.target_std or (1.0,) * spec.output_size
        self.register_buffer("target_mean", torch.tensor(targets, dtype=torch.float32), persistent=False)
        self.register_buffer("target_std", torch.tensor(scales, dtype=torch.float32), persistent=False)

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.feature_mean) / self.feature_std

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw features [keys, time, features] from zero state -> head outputs (pre-activation)."""
        return self.run(raw)[0]

    def run(self, raw: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Like forward, but from `state` (zero when None), returning the final (h, c) too, so a long
        history can be run in chunks that continue one another."""
        out, state = self.lstm(self.normalise(raw), state)
        return self.head(out), state

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """Head outputs -> what is published: raw-unit values, or class probabilities."""
        if self.spec.task == "classification":
            return torch.softmax(logits, dim=-1)
        return logits * self.target_std + self.target_mean
