"""The control rules (reset, end, expiry by TTL) as plan_batch plans them, without a broker or a model;
and the property that a batch means what its events one by one mean."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamlstm.config import StateConfig
from streamlstm.events import TS_MAX, TS_MIN, Event
from streamlstm.serving.plan import Expiry, Plan, plan_batch

NOW = 1_000_000
TTL = 100
OFFSET0 = 500  # event i of a batch has offset OFFSET0 + i
SETTINGS = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Table = dict[tuple[int, str], tuple[int, int]]  # the reference table: key -> (time, steps since zero state)


def ev(key: str = "k", ts: int | None = None, features: bool = True, reset: bool = False, end: bool = False) -> Event:
    return Event(key, [1.0] if features else None, ts, reset, end)


def plan(events: list[Event], times: dict[str, int] | None = None, ttl: int = TTL, event_clock: bool = True,
         record_times: list[int] | None = None, now: int = NOW) -> Plan:
    """Plan events of partition 0 against a table holding `times` (key -> time)."""
    times = times or {}
    return plan_batch([(0, e.key) for e in events], events, [OFFSET0 + i for i in range(len(events))],
                      record_times or [0] * len(events), lambda key: times.get(key[1]), Expiry(ttl, event_clock), now)


def test_a_first_event_steps_from_zero_without_being_fresh():
    p = plan([ev(ts=10)])
    assert (p.steps, p.fresh, p.times, p.tombstones, +p.dropped) == ([0], [False], [10], {}, Counter())


def test_reset_with_features_steps_from_zero():
    p = plan([ev(ts=10, reset=True)], times={"k": 5})
    assert (p.steps, p.fresh, p.tombstones, +p.dropped) == ([0], [True], {}, Counter())


def test_reset_without_features_drops_the_key():
    p = plan([ev(ts=10, features=False, reset=True)], times={"k": 5})
    assert (p.steps, p.tombstones, +p.dropped) == ([], {(0, "k"): OFFSET0}, Counter(reset=1))


def test_end_with_features_steps_then_drops_the_key():
    p = plan([ev(ts=10, end=True)], times={"k": 5})
    assert (p.steps, p.fresh, p.tombstones, +p.dropped) == ([0], [False], {(0, "k"): OFFSET0}, Counter(end=1))


def test_a_key_back_after_its_end_steps_from_zero_and_is_not_dropped():
    p = plan([ev(ts=10, end=True), ev(ts=11)], times={"k": 5})
    assert (p.steps, p.fresh, p.times, p.tombstones, +p.dropped) == ([0, 1], [False, True], [10, 11], {},
                                                                    Counter(end=1))


def test_a_key_back_after_a_control_only_reset_steps_from_zero():
    p = plan([ev(ts=10, features=False, reset=True), ev(ts=11)], times={"k": 5})
    assert (p.steps, p.fresh, p.tombstones, +p.dropped) == ([1], [True], {}, Counter(reset=1))


@pytest.mark.parametrize("event_clock", [True, False])
def test_a_gap_longer_than_the_ttl_expires_the_key(event_clock):
    t = NOW if not event_clock else 2000
    p = plan([ev(ts=2000)], times={"k": t - TTL - 1}, event_clock=event_clock)
    assert (p.fresh, p.times, +p.dropped) == ([True], [t], Counter(expired=1))


@pytest.mark.parametrize("event_clock", [True, False])
def test_a_gap_of_exactly_the_ttl_does_not_expire(event_clock):
    t = NOW if not event_clock else 2000
    p = plan([ev(ts=2000)], times={"k": t - TTL}, event_clock=event_clock)
    assert (p.fresh, +p.dropped) == ([False], Counter())


def test_a_gap_within_the_batch_expires_too():
    p = plan([ev(ts=10), ev(ts=10 + TTL + 1)])
    assert (p.fresh, +p.dropped) == ([False, True], Counter(expired=1))


@pytest.mark.parametrize("event_clock", [True, False])
def test_ttl_zero_never_expires(event_clock):
    p = plan([ev(ts=TS_MAX)], times={"k": TS_MIN}, ttl=0, event_clock=event_clock, now=TS_MAX)
    assert (p.fresh, +p.dropped) == ([False], Counter())


def test_the_event_clock_takes_ts_else_the_record_timestamp():
    p = plan([ev("a", ts=10), ev("b", ts=None)], record_times=[70, 80])
    assert p.times == [10, 80]


def test_the_processing_clock_takes_now():
    p = plan([ev("a", ts=10), ev("b", ts=None)], record_times=[70, 80], event_clock=False)
    assert p.times == [NOW, NOW]


def test_other_keys_are_unaffected():
    events = [ev("a", ts=10), ev("b", ts=10, features=False, reset=True), ev("c", ts=10, end=True),
              ev("d", ts=10), ev("a", ts=11), ev("d", ts=12)]
    p = plan(events, times={"a": 5, "d": 5 - TTL})
    assert (p.steps, p.fresh, p.times) == ([0, 2, 3, 4, 5], [False, False, True, False, False], [10, 10, 10, 11, 12])
    assert (p.tombstones, +p.dropped) == ({(0, "b"): OFFSET0 + 1, (0, "c"): OFFSET0 + 2},
                                          Counter(reset=1, end=1, expired=1))


def test_the_same_key_on_another_partition_is_another_key():
    events = [ev("k", ts=10, end=True), ev("k", ts=11)]
    p = plan_batch([(0, "k"), (1, "k")], events, [1, 2], [0, 0], lambda key: None, Expiry(TTL, True), NOW)
    assert (p.fresh, p.tombstones) == ([False, False], {(0, "k"): 1})


def test_expiry_from_config():
    assert Expiry.from_config(StateConfig(ttl_seconds=1.5, ttl_clock="event_time")) == Expiry(1500, True)
    assert Expiry.from_config(StateConfig(ttl_seconds=0, ttl_clock="processing_time")) == Expiry(0, False)


int64 = st.integers(TS_MIN, TS_MAX)


@SETTINGS
@given(ttl=st.integers(0, 2**40) | st.integers(0, 5), previous=int64, t=int64, event_clock=st.booleans())
def test_the_sweeps_cutoff_and_the_per_event_rule_agree(ttl, previous, t, event_clock):
    """A key the sweep drops at clock t is one an event at t finds expired, and the other way about."""
    expiry = Expiry(ttl, event_clock)
    cutoff = expiry.cutoff(t)
    assert TS_MIN <= cutoff <= TS_MAX  # fits the table's int64 cutoffs
    assert (previous < cutoff) == expiry.idle_too_long(previous, t)


# The property: planning a whole batch at once means what planning its events one by one means.

KEYS = [(partition, name) for partition in (0, 1) for name in ("a", "b", "c")]
small_times = st.integers(0, 60)


@st.composite
def events(draw) -> tuple[tuple[int, str], Event, int]:
    """A key, an event as the decoder accepts them (features, or at least one of reset and end), and
    the record's timestamp."""
    key = draw(st.sampled_from(KEYS))
    features, reset, end = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    if not (features or reset or end):
        reset, end = draw(st.sampled_from([(True, False), (False, True), (True, True)]))
    event = Event(key[1], [1.0] if features else None, draw(st.none() | small_times), reset, end)
    return key, event, draw(small_times)


def apply(table: Table, keys: list[tuple[int, str]], p: Plan) -> list[tuple[int, int]]:
    """Apply a plan as the daemon does (step in order, then drop the tombstoned keys); each step's
    (steps since zero state, time)."""
    stepped = []
    for i, fresh, t in zip(p.steps, p.fresh, p.times):
        key = keys[i]
        count = 1 if fresh or key not in table else table[key][1] + 1
        table[key] = (t, count)
        stepped.append((count, t))
    for key in p.tombstones:
        table.pop(key, None)
    return stepped


@SETTINGS
@given(batch=st.lists(events(), max_size=12),
       initial=st.dictionaries(st.sampled_from(KEYS), st.tuples(small_times, st.integers(1, 5))),
       ttl=st.sampled_from([0, 1, 5, 20]), event_clock=st.booleans())
def test_a_batch_means_what_its_events_one_by_one_mean(batch, initial, ttl, event_clock):
    keys, evs, record_times = [k for k, _, _ in batch], [e for _, e, _ in batch], [r for _, _, r in batch]
    offsets = [OFFSET0 + i for i in range(len(batch))]
    expiry, now = Expiry(ttl, event_clock), 30

    whole = dict(initial)
    p = plan_batch(keys, evs, offsets, record_times, lambda key: whole[key][0] if key in whole else None,
                   expiry, now)
    assert len(p.steps) == len(p.fresh) == len(p.times)
    whole_steps = dict(zip(p.steps, apply(whole, keys, p)))

    alone: Table = dict(initial)
    alone_steps: dict[int, tuple[int, int]] = {}
    dropped: Counter[str] = Counter()
    tombstones: dict[tuple[int, str], int] = {}
    for i in range(len(batch)):
        one = plan_batch([keys[i]], [evs[i]], [offsets[i]], [record_times[i]],
                         lambda key: alone[key][0] if key in alone else None, expiry, now)
        for step in apply(alone, [keys[i]], one):
            alone_steps[i] = step
        dropped += one.dropped
        tombstones.update(one.tombstones)

    assert whole_steps == alone_steps
    assert whole == alone
    assert +p.dropped == +dropped
    # The batch tombstones what is gone at its end, at the offset of the last event that dropped it.
    assert p.tombstones == {key: offset for key, offset in tombstones.items() if key not in alone}
