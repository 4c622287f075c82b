"""Retrying what fails: waits that double up to a ceiling, and start over after a success."""

from __future__ import annotations

BACKOFF_MAX_S = 30


class Backoff:
    """Waits of 1, 2, 4 … up to 30 s between tries of something failing, from 1 s again after a success."""

    def __init__(self) -> None:
        self.delay = 0.0

    @property
    def failing(self) -> bool:
        return self.delay > 0

    def next(self) -> float:
        self.delay = min(max(2 * self.delay, 1.0), BACKOFF_MAX_S)
        return self.delay

    def reset(self) -> None:
        self.delay = 0.0
