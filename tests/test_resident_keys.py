"""A bound on resident keys (state.max_resident_keys) as a specification, on the in-memory Kafka of
test_checkpoint_and_restore.py: whatever is evicted and fetched back, every key's state is the one an
unbounded daemon holds after the same events, through checkpoints (whole and in slices), drops,
restarts on the same state.dir and restores by a new owner. The broker tests are in test_eviction.py."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
from test_checkpoint_and_restore import P0, P1, KeyState, Node

from streamlstm.config import ConfigError, load_config
from streamlstm.state.store import PartitionStore

BOUND = 8


def all_states(node: Node, keys: list[tuple[int, str]]) -> dict[tuple[int, str], KeyState]:
    """Each key's state, fetched back a few at a time when the node has a bound; missing keys absent."""
    out = {}
    for i in range(0, len(keys), 4):
        chunk = keys[i:i + 4]
        node.resident.admit(chunk)
        for partition, key in chunk:
            row = node.table.row((partition, key))
            if row is not None:
                s = node.table.export([row])
                out[(partition, key)] = (s.h[:, 0].tolist(), s.c[:, 0].tolist(), int(s.steps[0]), int(s.offsets[0]),
                                         int(s.times[0]))
    return out


def count_hits(node: Node) -> list[int]:
    """The hits of every admit of the node from now on."""
    hits: list[int] = []
    admit = node.resident.admit

    def counting(keys):
        admitted = admit(keys)
        hits.append(admitted.hits if admitted else 0)
        return admitted

    node.resident.admit = counting  # type: ignore[method-assign]
    return hits


def play(nodes: list[Node], events: int, keys: int, seed: int) -> list[tuple[int, str]]:
    """The same random events on every node: steps, ends, and checkpoints whole or sent a slice at a time
    with events between (so keys are evicted while a take is not yet in the store); returns the keys."""
    rng = random.Random(seed)
    offsets = {0: 0, 1: 0}
    names = [(rng.randrange(2), f"k{i}") for i in range(keys)]
    for i in range(events):
        partition, key = names[min(int(rng.paretovariate(1.1)) - 1, keys - 1) if i % 2 else rng.randrange(keys)]
        end = rng.random() < 0.03
        for node in nodes:
            if end:
                node.end(partition, key, offsets[partition])
            else:
                node.step(partition, key, offsets[partition])
        offsets[partition] += 1
        if i % 37 == 36:
            for node in nodes:
                node.checkpointer.begin()
        if i % 37 == 3 and nodes[0].checkpointer.writing:
            for node in nodes:
                node.checkpointer.write(None)
                node.checkpointer.finish()
        if i % 101 == 100:
            for node in nodes:
                node.checkpointer.checkpoint()
    return names


def test_a_bounded_table_holds_the_same_state_as_an_unbounded_one_and_never_more_keys() -> None:
    bounded, reference = Node(max_resident_keys=BOUND), Node()
    for node in (bounded, reference):
        node.assign({P0, P1})
    hits = count_hits(bounded)
    names = play([bounded, reference], 1_500, 60, seed=3)
    assert len(bounded.table) <= BOUND and sum(hits) > 500, "keys must have been evicted and fetched back"
    assert all_states(bounded, names) == all_states(reference, names)
    bounded.checkpointer.checkpoint()
    bounded.stores.wait()
    assert all_states(bounded, names) == all_states(reference, names), "after the evicted keys reached the store"


@pytest.mark.parametrize("same_dir", [True, False])
def test_evicted_changes_reach_the_changelog_and_a_restore_keeps_only_the_bound_resident(same_dir: bool) -> None:
    """Restarted on its state.dir (the local store and the changelog after it) or a new owner (the whole
    changelog), with and without a bound: every key as the reference holds it."""
    bounded, reference = Node(max_resident_keys=BOUND), Node()
    for node in (bounded, reference):
        node.assign({P0, P1})
    names = play([bounded, reference], 800, 40, seed=4)
    bounded.checkpointer.checkpoint()
    reference.checkpointer.checkpoint()
    expected = all_states(reference, names)
    for bound in (0, BOUND):
        bounded.stores.close()
        again = bounded.restarted(max_resident_keys=bound) if same_dir else Node(bounded.broker, max_resident_keys=bound)
        again.reader.batch = 10_000  # records per restore poll: the whole changelog in a few
        again.assign({P0, P1})
        assert again.restores("local" if same_dir else "changelog") == 2
        assert len(again.table) == (BOUND if bound else len(expected))
        assert all_states(again, names) == expected
        bounded = again


def evicted_to_the_store(first: str, then: str) -> Node:
    """A node holding 2 keys: events of the keys `first`, a checkpoint into the store, then events of the
    keys `then` that evict them (offsets 0, 1, … in that order)."""
    n = Node(max_resident_keys=2)
    n.assign({P0})
    for offset, key in enumerate(first):
        n.step(0, key, offset)
    n.checkpointer.checkpoint()
    n.stores.wait()
    for offset, key in enumerate(then, start=len(first)):
        n.step(0, key, offset)
    return n


def test_a_key_dropped_while_its_old_state_is_in_the_store_comes_back_from_zero() -> None:
    n = evicted_to_the_store("aa", "bc")  # "a" evicted: its state is in the store
    n.end(0, "a", 4)  # fetched, then dropped: the store still has its state until the tombstone is written
    n.step(0, "b", 5)
    n.step(0, "c", 6)
    n.step(0, "a", 7)
    assert all_states(n, [(0, "a")])[(0, "a")][2:4] == (1, 7)
    n.checkpointer.checkpoint()  # the tombstone and the new state both taken, neither in the store yet
    n.step(0, "b", 8)
    n.step(0, "c", 9)
    assert all_states(n, [(0, "a")])[(0, "a")][2:4] == (1, 7)


def test_a_store_that_cannot_be_read_is_reported_and_nothing_is_loaded_from_it() -> None:
    n = evicted_to_the_store("ab", "cd")  # a and b evicted, their state only in the store
    n.stores.store(0).close()  # (its last connection closed: the WAL is folded into the file)
    n.stores.store(0).path.write_bytes(b"not a database" * 100)
    admitted = n.resident.admit([(0, "a")])
    assert admitted is not None and admitted.failed == {0} and n.table.row((0, "a")) is None


def test_eviction_picks_the_least_recently_used_keys() -> None:
    n = Node(max_resident_keys=3)
    n.assign({P0})
    for offset, key in enumerate("abc"):
        n.step(0, key, offset)
    n.step(0, "a", 3)  # b is now the least recently used
    n.step(0, "d", 4)
    assert {key for key in n.table._rows} == {(0, "a"), (0, "c"), (0, "d")}
    assert np.count_nonzero(n.table.shards >= 0) == 3


def test_a_bound_below_a_polls_records_stops_startup_naming_both_keys() -> None:
    with pytest.raises(ConfigError, match="state.max_resident_keys: 100 is below kafka.max_poll_records"):
        load_config(overrides=["state.max_resident_keys=100", "kafka.max_poll_records=500"], environ={})
    assert load_config(overrides=["state.max_resident_keys=500", "kafka.max_poll_records=500"],
                       environ={}).state.max_resident_keys == 500


def test_evicting_faster_than_the_store_writes_waits_for_it(monkeypatch) -> None:
    """Keys evicted before their checkpoint reached the store are held in memory; past 1/8 of the bound
    the daemon waits for the store's writer instead of holding more (back pressure)."""
    write = PartitionStore.write

    def slow_write(self, *args, **kwargs):
        time.sleep(0.2)
        return write(self, *args, **kwargs)

    monkeypatch.setattr(PartitionStore, "write", slow_write)
    n = Node(max_resident_keys=16)
    n.assign({P0})
    for offset in range(16):
        n.step(0, f"old{offset}", offset)
    n.checkpointer.checkpoint()  # taken and committed; the store write takes 0.2 s
    n.resident.admit([(0, f"new{i}") for i in range(16)])  # evicts all 16, none in the store yet
    assert n.resident.evicted_pending() <= 16 // 8
    assert all_states(n, [(0, "old3")])[(0, "old3")][2:4] == (1, 3)
