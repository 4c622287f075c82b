"""Offline scoring: each key's whole event sequence through nn.LSTM from zero state.

A key's sequence starts over at an event with `reset` and after one with `end`, as in the daemon.

This is the reference the daemon must equal: it shares no step code with the streaming path, only the
weights, so agreement between the two is evidence, not tautology.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..events import Event, sequences
from ..model.artifact import Artifact
from ..model.network import LSTMForecaster


@torch.inference_mode()
def score_events(
    artifact: Artifact, events: Sequence[Event], keys_per_batch: int = 256, state_dtype: str = "float32"
) -> tuple[np.ndarray, np.ndarray]:
    """Prediction and step (1-based position within its key's sequence) for every event, in input order.

    Control-only events (no features) end a sequence and get no prediction: their rows stay zero.
    With a `state_dtype` other than float32, h and c are rounded to it after every step, as the daemon
    stores them under that state.dtype.
    """
    model = artifact.model
    groups = sorted(sequences(events), key=len)
    predictions = np.zeros((len(events), model.spec.output_size), dtype=np.float32)
    steps = np.zeros(len(events), dtype=np.int64)
    device = next(model.parameters()).device
    for start in range(0, len(groups), keys_per_batch):
        batch = groups[start : start + keys_per_batch]
        longest = len(batch[-1])
        x = torch.zeros(len(batch), longest, model.spec.input_size)
        for b, positions in enumerate(batch):
            x[b, : len(positions)] = torch.tensor([events[i].features for i in positions])
        x = x.to(device)
        logits = model(x) if state_dtype == "float32" else _rounded_run(model, x, getattr(torch, state_dtype))
        out = model.predictions(logits).cpu().numpy()
        for b, positions in enumerate(batch):
            predictions[positions] = out[b, : len(positions)]
            steps[positions] = np.arange(1, len(positions) + 1)
    return predictions, steps



def _rounded_run(model: LSTMForecaster, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """model(x), one timestep at a time, its state rounded to `dtype` between steps."""
    outs, state = [], None
    for t in range(x.shape[1]):
        out, (h, c) = model.run(x[:, t : t + 1], state)
        state = (h.to(dtype).float(), c.to(dtype).float())
        outs.append(out)
    return torch.cat(outs, dim=1)
