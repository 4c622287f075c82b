"""Streaming prediction: a poll's events become batched LSTM steps over the per-key state table.

All keys present advance together in one step; a key present k times advances k times, in order, in k
successive steps, so no key is ever twice in one step. On CUDA the steps replay CUDA graphs
(graphed_step.py); elsewhere they run as eager torch operations. Knows nothing of Kafka.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from ..config import ConfigError
from ..state.table import StateKey, StateTable
from .artifact import Artifact
from .cell import layer_weights, lstm_step

if TYPE_CHECKING:
    from .graphed_step import GraphedStep


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without one is a configuration error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config: model.device: cuda was requested but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def step_rounds(rows: np.ndarray) -> list[np.ndarray]:
    """Positions of the events in each successive step: round r holds each row's r-th event.

    Vectorised over the events' table rows (one per key), with no Python loop per event: an event's
    round is its rank among the events of its row, in order.
    """
    n = len(rows)
    by_row = np.argsort(rows, kind="stable")
    sorted_rows = rows[by_row]
    first = np.empty(n, dtype=bool)
    first[:1] = True
    np.not_equal(sorted_rows[1:], sorted_rows[:-1], out=first[1:])
    if first.all():
        return [np.arange(n)]
    positions = np.arange(n)
    rank = positions - np.maximum.accumulate(np.where(first, positions, 0))
    rounds = np.empty(n, dtype=np.int64)
    rounds[by_row] = rank
    order = np.argsort(rounds, kind="stable")
    return np.split(order, np.cumsum(np.bincount(rounds))[:-1])


class Advance(NamedTuple):
    predictions: np.ndarray  # [n, outputs]
    steps: np.ndarray  # each key's step count after its event
    rows: np.ndarray  # each key's row in the state table
    step_stats: list[tuple[int, float]]  # (batch size, seconds) of every step taken, for the caller's metrics


class StreamingPredictor:
    def __init__(self, artifact: Artifact, device: torch.device, cuda_graphs: bool = True,
                 max_batch: int = 8192, table: StateTable | None = None, state_dtype: str = "float32") -> None:
        """`table`: the keys' state to carry on with (a model swapped in); it must have this model's shape.
        Otherwise a new one holds h and c as `state_dtype` (state.dtype)."""
        self.model = artifact.model.to(device)
        self.version = artifact.version
        self.device = device
        self.layers = layer_weights(self.model.lstm)
        spec = artifact.spec
        if table is None:
            table = StateTable(spec.num_layers, spec.hidden_size, device, dtype=state_dtype)
        self.table = table
        self.graphed: GraphedStep | None = None
        if cuda_graphs and device.type == "cuda":
            # Imported here: Triton comes with it, and a CPU process never loads Triton.
            from .graphed_step import GraphedStep

            self.graphed = GraphedStep(self.model, self.table, max_batch)
        self._mean = self.model.feature_mean.cpu().numpy()
        self._std = self.model.feature_std.cpu().numpy()

    # no_grad, not inference_mode: a table grown inside inference mode could not be restored into later
    @torch.no_grad()
    def advance(
        self, keys: Sequence[StateKey], features: Sequence[Sequence[float]], fresh: np.ndarray | None = None
    ) -> Advance:
        """Apply one event per position, in order; `fresh[i]` zeroes the key's state before event i."""
        if self.graphed is not None and len(keys):
            return self._advance_graphed(self.graphed, keys, features, fresh)
        rows = self.table.rows(keys)
        x = self.model.normalise(torch.from_numpy(np.array(features, dtype=np.float32)).to(self.device))
        top = torch.empty(len(keys), self.model.spec.hidden_size, device=self.device)
        steps = torch.empty(len(keys), dtype=torch.int64)
        stats: list[tuple[int, float]] = []
        for positions in step_rounds(rows.numpy()):
            started = time.perf_counter()
            pos = torch.from_numpy(positions)
            pos_dev = pos.to(self.device, non_blocking=True)
            step_rows = rows[pos]
            if fresh is not None and fresh[positions].any():
                self.table.reset(rows[positions[fresh[positions]]].tolist())
            h, c = self.table.gather(step_rows)
            h, c = lstm_step(x.index_select(0, pos_dev), h, c, self.layers)
            steps[pos] = self.table.scatter(step_rows, h, c)
            top.index_copy_(0, pos_dev, h[-1])
            stats.append((len(positions), time.perf_counter() - started))
        predictions = self.model.predictions(self.model.head(top))
        return Advance(predictions.cpu().numpy(), steps.numpy(), rows.numpy(), stats)

    def _advance_graphed(self, graphed: GraphedStep, keys: Sequence[StateKey], features: Sequence[Sequence[float]],
                         fresh: np.ndarray | None) -> Advance:
        """advance through GraphedStep: the same steps, inputs normalised on the host (same float32 math)."""
        rows = self.table.rows(keys)
        x = (np.asarray(features, dtype=np.float32) - self._mean) / self._std
        order, steps = [], []
        most = graphed.max_batch
        for positions in step_rounds(rows.numpy()):
            for chunk in (positions[i:i + most] for i in range(0, len(positions), most)):
                step_rows = rows[torch.from_numpy(chunk)]
                resets = [] if fresh is None else step_rows[torch.from_numpy(fresh[chunk])].tolist()
                steps.append((step_rows, resets))
                order.append(chunk)
        done = np.concatenate(order)
        predictions, counts, seconds = graphed.run(steps, x[done])
        by_event = np.empty_like(predictions)
        by_event[done] = predictions
        step_counts = np.empty(len(keys), dtype=np.int64)
        step_counts[done] = counts
        stats = [(len(step_rows), s) for (step_rows, _), s in zip(steps, seconds)]
        return Advance(by_event, step_counts, rows.numpy(), stats)
