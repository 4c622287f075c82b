"""A one-line progress bar with the running loss, redrawn in place on a terminal (tqdm-like, no dependency)."""

from __future__ import annotations

from typing import TextIO

WIDTH = 24


class ProgressBar:
    """Draws `label [#####.....] done/total loss x` on `stream`; does nothing without a stream."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self.drawn = False  # a line is on screen and not yet ended

    def update(self, label: str, done: int, total: int, loss: float) -> None:
        if self.stream is None:
            return
        filled = WIDTH * done // max(total, 1)
        self.stream.write(f"\r{label} [{'#' * filled}{'.' * (WIDTH - filled)}] {done}/{total} loss {loss:.5f}")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        """End the line, so what is written next starts on a fresh one."""
        if self.stream is not None and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False
