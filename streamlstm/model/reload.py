"""Hot reload: notice a newer artifact under model.path and load it off the serving thread.

The serving loop asks `poll()` between two steps and only ever gets a model that loaded completely (or
the reason one did not), so no event is predicted by a half-loaded model. Knows nothing of Kafka.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from .artifact import (
    Artifact,
    ArtifactError,
    load_artifact,
    newest_artifact,
    written_at,
)


def _identity(path: Path) -> tuple[Path, int | None]:
    """An artifact directory as of its model.json: one rewritten in place is a new artifact."""
    return path, written_at(path)


class ModelWatcher:
    def __init__(self, root: str | Path, serving: Path, device: torch.device, interval_s: float) -> None:
        self.root = Path(root)
        self.device = device
        self.interval_s = interval_s
        self._serving = _identity(serving)
        self._failed: set[tuple[Path, int | None]] = set()  # not retried until they change
        self._loading: tuple[tuple[Path, int | None], Future[Artifact]] | None = None
        self._next_look = time.monotonic() + interval_s
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="model-reload")

    def poll(self) -> Artifact | ArtifactError | None:
        """A newly loaded artifact to swap in, the error of one that failed to load, or None (nothing new)."""
        if self._loading is not None:
            return self._collect()
        if not self.interval_s or time.monotonic() < self._next_look:
            return None
        self._next_look = time.monotonic() + self.interval_s
        candidate = _identity(newest_artifact(self.root))
        if candidate != self._serving and candidate not in self._failed:
            self._loading = candidate, self._pool.submit(load_artifact, candidate[0], self.device)
        return None

    def _collect(self) -> Artifact | ArtifactError | None:
        assert self._loading is not None, "poll() collects only a load under way"
        candidate, future = self._loading
        if not future.done():
            return None
        self._loading = None
        try:
            artifact = future.result()
        except Exception as exc:  # whatever went wrong, the serving model stays
            self._failed.add(candidate)
            return exc if isinstance(exc, ArtifactError) else ArtifactError(f"model: {candidate[0]}: {exc!r}")
        self._serving = candidate
        return artifact

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
