"""The forecaster: nn.LSTM and a linear head, plus the description that travels with its weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..config import Task
from ..events import FLOAT32_MAX

State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each [layers, keys, hidden]


@dataclass(frozen=True)
class ModelSpec:
    """Everything besides the weights that is needed to turn raw features into published predictions.

    Regression outputs are next-event values of `outputs` (feature names) in raw units; classification
    outputs are probabilities of the classes named in `outputs`.
    """

    task: Task  # config.TASKS; artifact.py checks a loaded one against it
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

    feature_mean: torch.Tensor  # buffers, registered below: not saved with the weights (the spec holds them)
    feature_std: torch.Tensor
    target_mean: torch.Tensor
    target_std: torch.Tensor

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

    def feature_limits(self) -> tuple[tuple[float, float], ...]:
        """Per feature, the raw values within which a step cannot overflow float32.

        A feature far enough out (float32's maximum, a common "no data" sentinel, with input weights
        above 1) took the first layer's gates to inf - inf = NaN, and its key's state to NaN for good.
        Within these limits every normalised input is at most `reach` in magnitude, so each gate's
        pre-activation, at most sum|W_ih| * reach + sum|W_hh| + |b| since |h| <= 1, stays under half of
        float32's range (the rest is margin for rounding). Deeper layers take h, within [-1, 1], and c
        grows by at most 1 a step: neither can overflow. Typically reach is ~1e37 standard deviations.
        """
        weight_ih, weight_hh, bias_ih, bias_hh = self.lstm.all_weights[0]  # the first layer's
        w_ih = weight_ih.detach().double().abs().sum(1)
        rest = weight_hh.detach().double().abs().sum(1) + (bias_ih + bias_hh).detach().double().abs()
        reach = max(((FLOAT32_MAX / 2 - rest) / w_ih.clamp(min=1.0)).min().item(), 0.0)
        spreads = (min(reach * std, FLOAT32_MAX / 4) for std in self.spec.feature_std)
        return tuple((max(mean - s, -FLOAT32_MAX), min(mean + s, FLOAT32_MAX))
                     for mean, s in zip(self.spec.feature_mean, spreads))

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
