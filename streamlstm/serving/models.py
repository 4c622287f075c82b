"""The models a daemon serves, one per lane (serving/lane.py): the primary from model.path and, with
model.shadow_path, a shadow, each hot-reloaded from its own path; and what a swap does to their state.

A newer primary carries the keys' state on (on_reload: keep_state, same shape) or restarts them from
zero, unless it is the version the shadow runs: then it is a promotion, and the shadow's table becomes
the primary's (warm, whatever its shape), every key of it written to the primary's changelog by the
next checkpoint; the shadow, now of the served version, goes idle (Lane). Served away from the shadow's
version again (a rollback), the shadow steps on from the state it had handed over. A newer shadow starts from
zero: it takes only state of its own version, so a shadow of a new version warms up from the events it
sees. Both models read the same decoded events, so their features must agree. Knows nothing of Kafka.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config import Config
from ..model.artifact import Artifact, ArtifactError, load_artifact, newest_artifact
from ..model.predictor import StreamingPredictor
from ..model.reload import ModelWatcher
from .accuracy import live_accuracy
from .lane import Lane
from .metrics import Metrics

log = logging.getLogger("streamlstm.daemon")


def load_models(cfg: Config, device: torch.device | None = None) -> tuple[Artifact, Artifact | None]:
    """The served artifact and the shadow's (None without model.shadow_path), as serving starts them (on
    the CPU without `device`); raises ArtifactError."""
    primary = load_artifact(newest_artifact(cfg.model.path), device or torch.device("cpu"))
    return primary, load_shadow(cfg, device or torch.device("cpu"), primary)


def load_shadow(cfg: Config, device: torch.device, primary: Artifact) -> Artifact | None:
    """The shadow's artifact (None without model.shadow_path); an ArtifactError names the key."""
    if not cfg.model.shadow_path:
        return None
    try:
        shadow = load_artifact(newest_artifact(cfg.model.shadow_path), device)
    except ArtifactError as exc:  # its advice names model.path: here it is model.shadow_path
        raise ArtifactError(f"model.shadow_path: {str(exc).replace('model.path', 'model.shadow_path')}") from None
    if mismatch := features_differ(primary, shadow):
        raise ArtifactError(f"model.shadow_path: {mismatch}")
    return shadow


def features_differ(primary: Artifact, shadow: Artifact) -> str | None:
    """Why the two models cannot read the same events, if they cannot."""
    if primary.spec.features == shadow.spec.features:
        return None
    return (f"the shadow {shadow.version} reads features {list(shadow.spec.features)}, the served model "
            f"{primary.version} {list(primary.spec.features)}: both step on the same events, so they must agree")


def accepts(artifact: Artifact, keep_any_version: bool) -> tuple[int, int, str | None]:
    """The changelog state a model takes on: its shape, and unless `keep_any_version` only its version's."""
    spec = artifact.spec
    return spec.num_layers, spec.hidden_size, None if keep_any_version else artifact.version


class Models:
    """The served artifacts and their watchers; `swap_*` put a newly loaded one into its lane."""

    def __init__(self, cfg: Config, device: torch.device, metrics: Metrics, primary: Artifact,
                 shadow: Artifact | None) -> None:
        self.cfg = cfg
        self.device = device
        self.metrics = metrics
        self.primary = primary
        self.shadow = shadow
        interval = cfg.model.reload_interval_s
        self.watcher = ModelWatcher(cfg.model.path, primary.path, device, interval)
        self.shadow_watcher = ModelWatcher(cfg.model.shadow_path, shadow.path, device, interval) if shadow else None

    def predictor(self, artifact: Artifact, lane: Lane | None = None) -> StreamingPredictor:
        """A predictor for `artifact`, on the lane's table (None: a new one)."""
        return StreamingPredictor(artifact, self.device, table=None if lane is None else lane.table,
                                  state_dtype=self.cfg.state.dtype)

    def put(self, lane: Lane, artifact: Artifact, predictor: StreamingPredictor) -> None:
        """`artifact` served by `lane` from now on, with its live accuracy."""
        keep = lane.role == "primary" and self.cfg.model.on_reload == "keep_state"
        scoring = live_accuracy(artifact, predictor.table, self.metrics) if self.cfg.model.live_accuracy else None
        predictor.table.keep_outputs(artifact.spec.output_size)
        lane.take_on(predictor, accepts(artifact, keep), scoring)

    def swap_primary(self, loaded: Artifact, primary: Lane, shadow: Lane | None) -> str:
        """Serve `loaded` in the primary lane; returns what became of the keys' state, for the log."""
        old = self.primary
        self.primary = loaded
        if shadow is not None and self.shadow is not None and loaded.version == shadow.version != old.version:
            promoted, served = shadow.table, primary.table
            gone = [key for key in served.keys() if promoted.row(key) is None]  # keys the shadow never saw
            promoted.drop(gone, served.last_offsets(gone))  # tombstoned: the served model's state is the shadow's
            promoted.mark_changed()  # every key into the primary's changelog at the next checkpoint
            self.put(primary, loaded, StreamingPredictor(loaded, self.device, table=promoted))
            self.put(shadow, self.shadow, self.predictor(self.shadow))  # idle, with an empty table
            return f"taken on from the shadow ({len(promoted)} keys, promoted)"
        spec, table = loaded.spec, primary.table
        keep = (self.cfg.model.on_reload == "keep_state"
                and (spec.num_layers, spec.hidden_size) == (table.h.shape[0], table.h.shape[2]))
        if shadow is not None and self.shadow is not None and shadow.version == old.version:
            # back from the shadow's version (a rollback): the shadow steps again, on the state it handed over
            warm = table.copy() if keep else table
            warm.mark_changed()  # its changelog holds the state as of the promotion: brought up to date
            self.put(shadow, self.shadow, StreamingPredictor(self.shadow, self.device, table=warm))
            if not keep:
                self.put(primary, loaded, self.predictor(loaded))
                return "restarted from zero (the shadow carries the old model's on)"
        if not keep:
            primary.resident.restart(spec.num_layers, spec.hidden_size)
        self.put(primary, loaded, self.predictor(loaded, primary))
        return "carried over" if keep else "restarted from zero"

    def swap_shadow(self, loaded: Artifact, shadow: Lane) -> None:
        """A new shadow: its keys start from zero (a shadow takes only its own version's state)."""
        self.shadow = loaded
        shadow.resident.restart(loaded.spec.num_layers, loaded.spec.hidden_size)
        self.put(shadow, loaded, self.predictor(loaded, shadow))

    def refused(self, loaded: Artifact, role: str) -> str | None:
        """Why a newly loaded artifact cannot be served in `role`'s lane beside the other model, if not."""
        other = self.shadow if role == "primary" else self.primary
        if other is None:
            return None
        return features_differ(loaded, other) if role == "primary" else features_differ(other, loaded)

    def close(self) -> None:
        self.watcher.close()
        if self.shadow_watcher is not None:
            self.shadow_watcher.close()


def shadow_dir(state_dir: Path) -> Path:
    """The shadow's local stores: beside the primary's, in a directory of their own (each is locked)."""
    return state_dir / "shadow"
