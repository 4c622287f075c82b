"""The per-event control rules (reset, end, expiry by TTL), as a pure function of a batch.

Planning a batch applies the rules in event order, so that a batch means what its events one by one
mean. Knows nothing of Kafka, torch or the state table: it sees the table only through `time_of`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..events import TS_MIN, Event

if TYPE_CHECKING:  # only for annotations: importing the table would import torch
    from ..config import StateConfig
    from ..state.table import StateKey


@dataclass(frozen=True)
class Expiry:
    """The TTL rule, in one place, for both the per-event check (`idle_too_long`, while planning a
    batch) and the periodic sweep (`cutoff`, Checkpointer.expire), so the two cannot drift apart.

    A key expires when its last time is more than `ttl_ms` before the clock. For ints the two forms say
    the same: idle_too_long(previous, t) <=> previous < cutoff(t), since t - previous > ttl <=>
    previous < t - ttl. The sweep compares a whole shard's times at once, hence the cutoff form.
    """

    ttl_ms: int  # 0: keys never expire
    event_clock: bool  # True: event time (ts, else the record timestamp); False: processing time

    @classmethod
    def from_config(cls, cfg: StateConfig) -> Expiry:
        return cls(int(cfg.ttl_seconds * 1000), cfg.ttl_clock == "event_time")

    def clock(self, record_ts: int, event_ts: int | None, now_ms: int) -> int:
        """An event's time on the TTL clock: what its key's time becomes when it steps."""
        if not self.event_clock:
            return now_ms
        return record_ts if event_ts is None else event_ts

    def idle_too_long(self, previous: int | None, t: int) -> bool:
        """Whether a key last seen at `previous` (None: not live) has expired by time `t`."""
        return bool(self.ttl_ms) and previous is not None and t - previous > self.ttl_ms

    def cutoff(self, clock_ms: int) -> int:
        """Keys whose last time is below this have expired at `clock_ms`: clock_ms - ttl_ms.

        Never below the smallest int64 (the table's times are int64, and nothing is below it), which
        leaves the rule unchanged for int64 times; so with ttl 0 nothing expires, and a clock near the
        bottom of the range cannot overflow the table's int64 cutoffs.
        """
        return TS_MIN if not self.ttl_ms else max(clock_ms - self.ttl_ms, TS_MIN)


@dataclass
class Plan:
    """A batch's accepted events, as steps: which positions step, which start from zero, who is dropped."""

    steps: list[int] = field(default_factory=list)
    features: list[list[float]] = field(default_factory=list)  # of each step
    fresh: list[bool] = field(default_factory=list)
    times: list[int] = field(default_factory=list)
    tombstones: dict[StateKey, int] = field(default_factory=dict)  # dropped at the batch's end, at this offset
    dropped: Counter[str] = field(default_factory=Counter)  # by reason, including keys that came back


def plan_batch(keys: Sequence[StateKey], events: Sequence[Event], offsets: Sequence[int],
               record_times: Sequence[int], time_of: Callable[[StateKey], int | None], expiry: Expiry,
               now_ms: int) -> Plan:
    """Apply reset, end and expiry in event order, so a batch means what its events one by one mean.

    A key starts from zero state at a reset, after an end, and after a gap longer than the TTL on the
    TTL clock (so an idle key is expired whether or not the periodic sweep got to it first). `offsets`
    and `record_times` are each event's record offset and timestamp; `time_of` gives a key's time in
    the table (None: not there), which the batch's own earlier events override.
    """
    plan = Plan()
    last: dict[StateKey, int | None] = {}  # a key's time after this batch's events so far; None: dropped
    for i, (key, event, offset) in enumerate(zip(keys, events, offsets)):
        t = expiry.clock(record_times[i], event.ts, now_ms)
        previous = last[key] if key in last else time_of(key)
        expired = expiry.idle_too_long(previous, t)
        plan.dropped["expired"] += expired
        if event.features is None:
            _drop(plan, key, offset, "reset" if event.reset else "end")
            last[key] = None
            continue
        plan.tombstones.pop(key, None)  # it comes back: the tombstone would drop the state it steps to
        plan.steps.append(i)
        plan.features.append(event.features)
        plan.fresh.append(event.reset or expired or (key in last and last[key] is None))
        plan.times.append(t)
        last[key] = t
        if event.end:
            _drop(plan, key, offset, "end")
            last[key] = None
    return plan


def _drop(plan: Plan, key: StateKey, offset: int, reason: str) -> None:
    """Tombstone `key` at the batch's end (unless it steps again first), at the offset that dropped it."""
    plan.tombstones[key] = offset
    plan.dropped[reason] += 1
