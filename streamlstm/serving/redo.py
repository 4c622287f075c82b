"""Partitions redone after the broker refused some of their records (a record too large, a topic
deleted, an authorisation lost): back to their last commit, state included, after a backoff.

Nothing after that commit was committed, so no event is lost; their state goes back to it with them
(restored from the changelog), so no step is applied twice; their outputs since the commit may be
published again, as after a crash. A redone partition stops before the refused record and goes on from
it once everything before it is committed, so a record refused for good is all that each later retry
redoes and publishes again, not every event since the partition's last commit.
"""

from __future__ import annotations

import logging

from ..transport.api import Failure, Record, TopicPartition, Transport
from .backoff import Backoff
from .metrics import Metrics
from .restore import Restorer

log = logging.getLogger("streamlstm.daemon")


class Redo:
    def __init__(self, backoff: Backoff, metrics: Metrics) -> None:
        self.backoff = backoff
        self.metrics = metrics
        self._redoing: set[int] = set()  # partitions rewound and not committed since: backoff not over
        self._stop_at: dict[TopicPartition, int] = {}  # redone partitions' refused offsets
        self.reached: set[TopicPartition] = set()  # those stopped there, paused until committed up to it

    def held_back(self, io: Transport, records: list[Record]) -> list[Record]:
        """The records a redone partition may go on with: those before its refused one."""
        stop_at = self._stop_at
        if not stop_at:
            return records
        kept = []
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            if record.offset < stop_at.get(tp, record.offset + 1):
                kept.append(record)
            elif tp not in self.reached:
                self.reached.add(tp)
                io.pause({tp})
        return kept

    def rewind(self, io: Transport, restorer: Restorer, failed: dict[int, Failure]) -> None:
        """Redo the partitions whose records the broker refused from their last commit, after a backoff."""
        for failure in failed.values():
            self.metrics.delivery_failures.labels(failure.topic).inc()
        first = next(iter(failed.values()))
        delay = self.backoff.next()
        log.error("the broker refused records of input partitions %s (first: %s: %r); they go back to their last "
                  "commit and are redone in %.0f s; nothing after it is committed", sorted(failed), first.topic,
                  first.error, delay)
        partitions = {tp for tp in restorer.assigned if tp.partition in failed}
        for tp in partitions:
            self.reached.discard(tp)
            offset = failed[tp.partition].offset
            if offset is None:
                self._stop_at.pop(tp, None)
            else:
                self._stop_at[tp] = offset
        restorer.rewind(partitions, delay)
        self._redoing |= {tp.partition for tp in partitions}
        self.metrics.rewinds.inc(len(partitions))
        io.reopen_producer()

    def committed(self, io: Transport, assigned: set[TopicPartition], partitions: set[int]) -> None:
        """A checkpoint committed `partitions`: those stopped before their refused record go on from it once
        nothing before it is pending, and the backoff ends once every rewound partition has committed past
        the record refused."""
        held = {tp.partition for tp in self._stop_at}
        self._redoing &= {tp.partition for tp in assigned} - (partitions - held)
        for tp in [tp for tp in self.reached if not io.pending({tp})]:
            self.reached.discard(tp)
            io.seek(tp, self._stop_at.pop(tp))
            io.resume({tp})
        if not self._redoing:
            self.backoff.reset()

    def release(self, partitions: set[TopicPartition]) -> None:
        """Partitions leaving: their revocation commits what they did, their next owner goes on from there."""
        for tp in partitions:
            self._stop_at.pop(tp, None)
            self.reached.discard(tp)
