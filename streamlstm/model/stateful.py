"""streamlstm's per-key stateful LSTM as a library: the daemon's batched step inside any stream processor
(Quix Streams, Faust, a plain consumer loop), with no Kafka and no daemon.

The same engine as `streamlstm serve`: events are checked by the model's own event decoder (so what the
daemon would dead-letter raises ValueError here, naming why), a call's events advance in batched steps
over the state table (a key repeated in one call advances once per event, in order), and the
predictions equal the offline reference's (`streamlstm predict`) within 1e-5. State lives in memory
only: durability is the caller's, or the daemon's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..config import EventsConfig
from ..events import Event
from .artifact import load_artifact, newest_artifact
from .predictor import StreamingPredictor, resolve_device

SHARD = 0  # the library's keys are one shard: it has no partitions


class KeyState(NamedTuple):
    h: np.ndarray  # [layers, hidden], float32
    c: np.ndarray
    steps: int  # events applied since the key's state was zero


class StatefulLSTM:
    def __init__(self, model: str | Path, device: str = "auto", state_dtype: str = "float32",
                 events: EventsConfig = EventsConfig()) -> None:
        """`model`: an artifact directory (or a directory of them: the newest), as model.path takes;
        `device`, `state_dtype`, `events`: as model.device, state.dtype and the events section."""
        self.device = resolve_device(device)
        self.artifact = load_artifact(newest_artifact(model), self.device)
        self._predictor = StreamingPredictor(self.artifact, self.device, state_dtype=state_dtype)
        self._decoder = self.artifact.decoder(events)

    @property
    def version(self) -> str:
        return self.artifact.version

    @property
    def outputs(self) -> tuple[str, ...]:
        """What each prediction's columns are: the target features, or the classes (probabilities)."""
        return self.artifact.spec.outputs

    @torch.no_grad()
    def step(self, keys: Sequence[str], features: Sequence[Sequence[float] | Mapping[str, float]]) -> np.ndarray:
        """Advance each key by its event, in order, and return one prediction per event ([n, outputs]).

        `features[i]`: a list in the model's feature order, or a mapping naming each feature. Raises
        ValueError, naming the event and the reason, if any event is not one the daemon would accept;
        then no key has advanced."""
        if len(keys) != len(features):
            raise ValueError(f"step: {len(keys)} keys but {len(features)} feature rows")
        checked = [self._check(i, key, f) for i, (key, f) in enumerate(zip(keys, features))]
        if not checked:
            return np.zeros((0, len(self.outputs)), dtype=np.float32)
        return self._predictor.advance([(SHARD, key) for key in keys], checked).predictions

    def _check(self, i: int, key: str, features: Sequence[float] | Mapping[str, float]) -> list[float]:
        decoded = self._decoder.decode_object(key, {"features": dict(features) if isinstance(features, Mapping)
                                                                else list(features)})
        if not isinstance(decoded, Event) or decoded.features is None:
            reason, detail = decoded if not isinstance(decoded, Event) else ("missing_features", "no features")
            raise ValueError(f"step: event {i} (key {key!r}) is not valid: {reason}: {detail}")
        return decoded.features

    def reset(self, key: str) -> None:
        """Zero the key's state (h, c and its step count), as an event with "reset": true does first."""
        row = self._predictor.table.row((SHARD, key))
        if row is not None:
            self._predictor.table.reset([row])

    def drop(self, key: str) -> None:
        """Forget the key: its state is gone and its next event starts from zero."""
        self._predictor.table.forget([(SHARD, key)])

    def state(self, key: str) -> KeyState | None:
        """The key's h and c (float32 copies) and step count, or None for a key not held."""
        table = self._predictor.table
        row = table.row((SHARD, key))
        if row is None:
            return None
        h, c = table.gather(torch.tensor([row]))
        return KeyState(h[:, 0].cpu().numpy().copy(), c[:, 0].cpu().numpy().copy(), int(table.steps[row]))

    def __len__(self) -> int:
        """Keys held."""
        return len(self._predictor.table)
