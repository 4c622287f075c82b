"""GET /keys/{key}: what this daemon holds for one key, read without changing anything.

The HTTP thread never touches the state: it hands the key to the poll loop (KeyQueries.ask), which
answers between two polls (KeyQueries.answer_all), so an answer is a consistent picture of the key
after whole steps, and a store's connection is used by its own thread only. The key's partition is not
computed (producers' partitioners differ: Java's murmur2, librdkafka's CRC32): every assigned partition
is looked in, the resident keys first, then the keys evicted to the local stores.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np

from ..state import changelog
from ..state.dtypes import ELEMENTS, widen
from ..state.resident import ResidentKeys
from ..state.table import StateTable
from .http_server import JSON

ANSWER_TIMEOUT_S = 2.0  # a loop busy for longer (a long checkpoint, a restore's bulk load) answers 503
# Queries waiting at once: each holds one of the HTTP server's few check threads while it waits, and
# the probes and scrapes must always find one free (a flood of queries is answered 503 instead).
MAX_WAITING = 2
Answer = tuple[int, str, bytes]


@dataclass
class Holding:
    """Where the loop stands: the served table and resident keys, the partitions, the model's version."""

    table: StateTable
    resident: ResidentKeys
    assigned: list[int]
    restoring: list[int]
    version: str
    expose_state: bool
    shadow: tuple[StateTable, str] | None = None  # a stepping shadow's table and version


def _json(status: int, body: dict) -> Answer:
    return status, JSON, (json.dumps(body) + "\n").encode()


def describe(name: str, at: Holding) -> Answer:
    """The key's entry: resident (with its last prediction) or evicted to a local store; 503 while a
    partition it may be in is restoring; 404 when no assigned partition holds it."""
    table = at.table
    for partition in at.assigned:
        row = table.row((partition, name))
        if row is not None:
            body = {"key": name, "partition": partition, "resident": True, "steps": int(table.steps[row]),
                    "offset": int(table.offsets[row]), "time": int(table.times[row]), "model_version": at.version,
                    "prediction": _prediction(table, row)}
            if at.expose_state:
                body |= _state(table, row)
            if at.shadow is not None:
                body["shadow"] = _shadow(*at.shadow, (partition, name), at.expose_state)
            return _json(200, body)
    if at.restoring:
        return _json(503, {"key": name, "error": f"partitions {at.restoring} are restoring: the key may be in one",
                           "restoring": at.restoring})
    for partition in at.assigned:
        value = at.resident.stored_value(partition, name)
        if value is not None:
            return _json(200, _stored(name, partition, value, at))
    return _json(404, {"key": name, "error": f"no assigned partition ({at.assigned}) holds this key"})


def _state(table: StateTable, row: int) -> dict[str, list]:
    """The row's h and c, widened to float32 lists."""
    h, c = (widen(t[:, row].cpu().view(table.storage).numpy(), table.element).tolist() for t in (table.h, table.c))
    return {"h": h, "c": c}


def _shadow(table: StateTable, version: str, key: tuple[int, str], expose_state: bool) -> dict | None:
    """The key in the shadow's table (None: the shadow has not seen it since it started)."""
    row = table.row(key)
    if row is None:
        return None
    body = {"model_version": version, "steps": int(table.steps[row]), "prediction": _prediction(table, row)}
    return body | _state(table, row) if expose_state else body


def _prediction(table: StateTable, row: int) -> list[float] | None:
    """The key's last prediction; None before its first step here (loaded, fetched back, or not kept)."""
    if table.outputs is None or np.isnan(table.outputs[row]).any():
        return None
    return table.outputs[row].tolist()


def _stored(name: str, partition: int, value: bytes, at: Holding) -> dict:
    """An evicted key's entry from its changelog value (its last prediction is not kept there)."""
    layers, hidden = at.table.h.shape[0], at.table.h.shape[2]
    rows = changelog.decode(partition, [name], [value], layers, hidden, dtype=at.table.element.name)
    body: dict = {"key": name, "partition": partition, "resident": False, "model_version": at.version,
                  "prediction": None}
    if rows.keys:
        body |= {"steps": int(rows.steps[0]), "offset": int(rows.offsets[0]), "time": int(rows.times[0]),
                 "model_version": value[changelog.MODEL_AT:changelog.MODEL_AT + 16].decode("ascii", "replace").strip()}
        if at.expose_state:
            element = ELEMENTS[at.table.element.name]
            body |= {"h": widen(rows.h[:, 0], element).tolist(), "c": widen(rows.c[:, 0], element).tolist()}
    return body


class KeyQueries:
    """The mailbox between the HTTP thread and the poll loop."""

    def __init__(self) -> None:
        self._waiting: queue.SimpleQueue[tuple[str, Future[Answer]]] = queue.SimpleQueue()
        self._slots = threading.BoundedSemaphore(MAX_WAITING)

    def ask(self, name: str) -> Answer:
        """From the HTTP thread: the loop's answer, or 503 if it does not come in time (or too many wait)."""
        if not self._slots.acquire(blocking=False):
            return _json(503, {"key": name, "error": f"{MAX_WAITING} key queries are waiting already; try again"})
        try:
            answer: Future[Answer] = Future()
            self._waiting.put((name, answer))
            return answer.result(ANSWER_TIMEOUT_S)
        except FutureTimeout:
            return _json(503, {"key": name, "error": f"the poll loop did not answer within {ANSWER_TIMEOUT_S:g} s"})
        finally:
            self._slots.release()

    def answer_all(self, holding: Callable[[], Holding]) -> None:
        """From the poll loop, between polls: every query waiting."""
        while True:
            try:
                name, answer = self._waiting.get_nowait()
            except queue.Empty:
                return
            if not answer.done():
                answer.set_result(describe(name, holding()))
