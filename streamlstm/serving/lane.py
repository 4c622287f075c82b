"""A lane: one model stepped over the stream, with its own keyed state and the changelog that keeps it.

The daemon has the primary's lane and, with model.shadow_path, the shadow's: a second model stepped on
the same batches, with a table, local stores and changelog topic of its own, checkpointed by the same
checkpoint (one commit covers both lanes' records) and restored with the primary on every assignment.
A shadow of the served version is idle: it was promoted (its table became the primary's) and steps
nothing; its changelog is still read on assignment, because the primary may find there the newest state
of the served version (Restorer, PartitionRestore.adopt). Knows nothing of Kafka.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..events import Event
from ..model.predictor import Advance, StreamingPredictor
from ..state.resident import ResidentKeys
from ..state.store import LocalStores
from ..state.table import StateKey, StateTable
from ..transport.api import ChangelogSource
from .accuracy import ForecastAccuracy, LabelAccuracy


class Steps(NamedTuple):
    """A batch's steps as planned (plan_batch): the keys and inputs of each, in event order."""

    keys: list[StateKey]
    features: list[list[float]]
    fresh: np.ndarray
    offsets: np.ndarray
    times: np.ndarray
    events: list[Event]


@dataclass
class Lane:
    role: str  # "primary" or "shadow": in logs and on the key queries
    resident: ResidentKeys
    stores: LocalStores
    changelog_topic: str
    accepts: tuple[int, int, str | None]  # the changelog state its model takes on (see Restorer)
    version: str  # its model's, written into its changelog records
    reader: ChangelogSource | None = None  # of changelog_topic, once connected
    predictor: StreamingPredictor | None = None  # None: only the state (the checkpoint and restore tests)
    accuracy: ForecastAccuracy | LabelAccuracy | None = None

    @property
    def table(self) -> StateTable:
        return self.resident.table

    @property
    def changelog(self) -> ChangelogSource:
        if self.reader is None:
            raise RuntimeError(f"the {self.role} lane has no changelog reader before the daemon has connected")
        return self.reader

    def step(self, steps: Steps) -> Advance:
        """The planned steps on this lane's state: each key stamped with its event, its prediction kept
        for the key queries, and its forecast scored."""
        assert self.predictor is not None, "a lane steps with its model"
        result = self.predictor.advance(steps.keys, steps.features, steps.fresh)
        self.table.stamp(result.rows, steps.offsets, steps.times)
        self.table.set_outputs(result.rows, result.predictions)
        if self.accuracy is not None:
            self.accuracy.score(result.rows, result.steps, steps.events, result.predictions)
        return result

    def take_on(self, predictor: StreamingPredictor, accepts: tuple[int, int, str | None],
                accuracy: ForecastAccuracy | LabelAccuracy | None) -> None:
        """Serve `predictor` from now on: a model swapped in on the same table, or a promoted shadow's
        model with its table."""
        self.predictor = predictor
        self.resident.table = predictor.table
        self.accepts = self.resident.accepts = accepts
        self.version = self.resident.version = predictor.version
        self.accuracy = accuracy
