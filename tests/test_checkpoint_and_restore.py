"""Checkpointer and Restorer as specifications, on an in-memory Kafka (tests/memory_transport.py).

The same rules tests/test_durable_state.py checks against a real broker, here in milliseconds: what a
checkpoint sends and in which order, what it commits when the broker refuses records, and what state a
restore rebuilds from the changelog, cut at the committed offset.
"""

from __future__ import annotations

import tempfile
import zlib
from dataclasses import dataclass, field

from pathlib import Path

import numpy as np
import pytest
import torch
from memory_transport import MemoryBroker, MemoryChangelog, MemoryTransport

from streamlstm.config import KafkaConfig
from streamlstm.events import REASONS
from streamlstm.serving.checkpoint import Checkpointer, Outcome
from streamlstm.serving.lane import Lane
from streamlstm.serving.metrics import Metrics
from streamlstm.serving.plan import Expiry
from streamlstm.serving.restore import Restorer
from streamlstm.state import changelog
from streamlstm.state.resident import ResidentKeys
from streamlstm.state.store import LocalStores, PartitionStore, StoreMeta
from streamlstm.state.table import StateTable
from streamlstm.transport.api import (
    ChangelogSource,
    Rebalance,
    Record,
    TopicPartition,
    Transport,
    TransportError,
)

CPU = torch.device("cpu")
INPUT, CHANGELOG, SHADOW_CHANGELOG = "events", "events-state", "events-state-shadow"
P0, P1 = TopicPartition(INPUT, 0), TopicPartition(INPUT, 1)
LAYERS, HIDDEN = 2, 3
NO_TTL = Expiry(ttl_ms=0, event_clock=True)

KeyState = tuple[list[list[float]], list[list[float]], int, int, int]  # h, c, steps, offset, time


@dataclass
class Node:
    """One daemon's state, transport, checkpointer and restorer, wired as streamlstm.serving.daemon wires them."""

    broker: MemoryBroker = field(default_factory=MemoryBroker)
    layers: int = LAYERS
    hidden: int = HIDDEN
    expiry: Expiry = NO_TTL
    state_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="node-")))  # a fresh pod's
    max_resident_keys: int = 0
    version: str = "v1"
    shadow: tuple[str, int] | None = None  # a shadow lane's model version and hidden size

    def __post_init__(self) -> None:
        self.io = MemoryTransport(KafkaConfig(input_topic=INPUT), self.broker)
        self.reader = MemoryChangelog(self.broker, CHANGELOG)
        self.table = StateTable(self.layers, self.hidden, CPU, capacity=4)
        self.metrics = Metrics(REASONS, ("predictions", "events-dlq", CHANGELOG))
        self.stores = LocalStores(self.state_dir, CHANGELOG)
        accepts = (self.layers, self.hidden, None)
        self.resident = ResidentKeys(self.table, self.stores, self.max_resident_keys, accepts, self.version)
        self.lane = Lane("primary", self.resident, self.stores, CHANGELOG, accepts, self.version, self.reader)
        self.lanes = [self.lane]
        if self.shadow is not None:
            version, hidden = self.shadow
            table, stores = StateTable(self.layers, hidden, CPU, capacity=4), LocalStores(self.state_dir / "shadow",
                                                                                          SHADOW_CHANGELOG)
            accepts = (self.layers, hidden, version)
            self.lanes.append(Lane("shadow", ResidentKeys(table, stores, 0, accepts, version), stores, SHADOW_CHANGELOG,
                                   accepts, version, MemoryChangelog(self.broker, SHADOW_CHANGELOG)))
        self.checkpointer = Checkpointer(self.io, self.lanes, self.metrics, self.expiry)
        self.restorer = Restorer(self.io, self.lanes, INPUT, self.metrics)

    def on_revoked(self, partitions: set[TopicPartition]) -> None:
        self.restorer.on_revoked(partitions)
        self.checkpointer.on_revoked(partitions)

    def on_assigned(self, partitions: set[TopicPartition]) -> None:
        self.restorer.on_assigned(partitions)

    def on_lost(self, partitions: set[TopicPartition]) -> None:
        self.restorer.on_lost(partitions)
        self.checkpointer.forget(partitions)
        self.io.abort()
        self.io.forget(partitions)

    def step(self, partition: int, key: str, offset: int, time_ms: int = 1_000, admit: bool = True) -> None:
        """An event of `key` at `offset` applied as the daemon applies one: the key made resident (unless
        its whole poll was, `admit` False), its row stepped to a new h and c that depend on the old ones
        and on the key and offset (the same on every node for the same history), stamped, the record
        marked done."""
        if admit:
            self.resident.admit([(partition, key)])
        for lane in self.lanes[:1] + [lane for lane in self.lanes[1:] if lane.version != self.lane.version]:
            table = lane.table
            rows = table.rows([(partition, key)])
            g = torch.Generator().manual_seed(zlib.crc32(f"{partition}/{key}/{offset}".encode()))
            h, c = table.gather(rows)
            table.scatter(rows, h / 2 + torch.randn(*h.shape, generator=g), c / 2 + torch.randn(*c.shape, generator=g))
            table.stamp(rows.numpy(), np.array([offset]), np.array([time_ms]))
        self.io.mark_done([Record(INPUT, partition, offset, time_ms, key.encode(), b"{}", [])])

    def end(self, partition: int, key: str, offset: int, admit: bool = True) -> None:
        """An event that ends `key`: it is dropped, to be tombstoned at `offset`."""
        if admit:
            self.resident.admit([(partition, key)])
        self.table.drop([(partition, key)], [offset])
        self.io.mark_done([Record(INPUT, partition, offset, 0, key.encode(), b'{"end": true}', [])])

    def assign(self, partitions: set[TopicPartition]) -> int:
        """A rebalance that gives this node `partitions`, then restore steps until it is done; returns
        how many steps it took."""
        self.io.rebalance(self, partitions)
        return self.restore()

    def restore(self, most: int = 100) -> int:
        """Restore steps, as the daemon's loop takes them between polls, until none is under way."""
        for steps in range(1, most):
            self.restorer.step()
            if not self.restorer.busy:
                return steps
        raise AssertionError("the restore never finished")

    def state(self, shard: int, lane: int = 0) -> dict[str, KeyState]:
        """Each key of `shard` in a lane's table, with everything a restore must bring back."""
        table = self.lanes[lane].table
        rows = np.flatnonzero(table.shards == shard).tolist()
        if not rows:
            return {}
        s = table.export(rows)
        return {key: (s.h[:, i].tolist(), s.c[:, i].tolist(), int(s.steps[i]), int(s.offsets[i]), int(s.times[i]))
                for i, (_, key) in enumerate(s.keys)}

    def skipped(self, reason: str) -> float | None:
        return self.metrics.registry.get_sample_value("streamlstm_restore_skipped_records_total", {"reason": reason})

    def restores(self, source: str) -> float | None:
        return self.metrics.registry.get_sample_value("streamlstm_restores_total", {"source": source})

    def replayed(self, source: str) -> float | None:
        return self.metrics.registry.get_sample_value("streamlstm_restore_replayed_records_total", {"source": source})

    def refused(self, reason: str) -> float | None:
        return self.metrics.registry.get_sample_value("streamlstm_local_store_refused_total", {"reason": reason})

    def restarted(self, **changes: object) -> Node:
        """This node's process started again on the same state.dir (the broker's records kept)."""
        for lane in self.lanes:
            lane.stores.close()
        return Node(self.broker, state_dir=self.state_dir, **{"layers": self.layers, "hidden": self.hidden,
                                                              "version": self.version, "shadow": self.shadow} | changes)

    def sends(self) -> list[str]:
        return [call for call in self.io.calls if call.startswith("send")]


def changelog_offsets(broker: MemoryBroker, partition: int) -> list[tuple[str, int | None]]:
    """Each record of a changelog partition, in log order: its key and the input offset it reflects."""
    return [((r.key or b"").decode(), changelog.source_offset(r.value, r.headers or []))
            for r in broker.records(CHANGELOG, partition)]


def test_the_in_memory_doubles_implement_the_transport_protocols() -> None:
    """mypy holds these annotated assignments to the Protocols; here, every member is at least there."""
    broker = MemoryBroker()
    transport: Transport = MemoryTransport(KafkaConfig(input_topic=INPUT), broker)
    source: ChangelogSource = MemoryChangelog(broker, CHANGELOG)
    listener: Rebalance = Node(broker)
    for protocol, double in ((Transport, transport), (ChangelogSource, source), (Rebalance, listener)):
        members = {name for name in vars(protocol) if not name.startswith("_")}
        assert members and all(callable(getattr(double, name, None)) for name in members), protocol


# Checkpoints.

def test_a_checkpoint_sends_tombstones_then_changed_state_then_flushes_then_commits() -> None:
    n = Node()
    n.step(0, "a", 0)
    n.step(0, "b", 1)
    n.step(1, "c", 0)
    n.step(0, "x", 2)
    n.end(0, "x", 3)
    assert n.checkpointer.checkpoint() == Outcome({0, 1}, {})
    assert n.io.calls == [
        "send events-state/0 x (tombstone)",
        "send events-state/0 a",
        "send events-state/0 b",
        "send events-state/1 c",
        "flush",
        "commit events/0@4 events/1@1",
    ]
    assert changelog_offsets(n.broker, 0) == [("x", 3), ("a", 0), ("b", 1)]
    assert n.broker.committed == {P0: 4, P1: 1} and n.io.pending() == {}


def test_a_checkpoint_with_nothing_to_do_sends_flushes_and_commits_nothing() -> None:
    n = Node()
    assert n.checkpointer.checkpoint() == Outcome(set(), {}) and n.io.calls == []
    n.step(0, "a", 0)
    n.checkpointer.checkpoint()
    calls = list(n.io.calls)
    assert n.checkpointer.checkpoint() == Outcome(set(), {}) and n.io.calls == calls


def test_a_checkpoint_first_expires_idle_keys_and_writes_their_tombstones() -> None:
    n = Node(expiry=Expiry(ttl_ms=1_000, event_clock=True))
    n.step(0, "idle", 0, time_ms=1_000)
    n.step(0, "busy", 1, time_ms=5_000)  # the shard's stream time: "idle" is 4 s behind it
    n.checkpointer.checkpoint()
    assert n.sends() == ["send events-state/0 idle (tombstone)", "send events-state/0 busy"]
    assert changelog_offsets(n.broker, 0) == [("idle", 0), ("busy", 1)]
    assert n.metrics.registry.get_sample_value("streamlstm_keys_dropped_total", {"reason": "expired"}) == 1


def test_a_partition_with_a_refused_record_is_not_committed_and_is_named_failed() -> None:
    n = Node()
    n.step(0, "a", 0)
    n.step(1, "b", 0)
    n.io.refuse(CHANGELOG, 1)
    outcome = n.checkpointer.checkpoint()
    assert outcome.committed == {0} and set(outcome.failed) == {1} and outcome.failed[1].topic == CHANGELOG
    assert n.io.calls[-2:] == ["flush", "commit events/0@1"]
    assert n.broker.committed == {P0: 1} and n.io.pending() == {P1: 1}
    assert changelog_offsets(n.broker, 1) == []


@pytest.mark.parametrize("at_send", [False, True], ids=["refused-in-a-delivery-report", "refused-as-sent"])
def test_a_refused_partitions_later_records_are_not_even_sent(at_send: bool) -> None:
    n = Node()
    for offset, key in enumerate(["b1", "b2", "b3"]):
        n.step(1, key, offset)
    n.step(0, "a", 0)
    n.io.refuse(CHANGELOG, 1, at_send=at_send)
    n.checkpointer.begin()
    n.checkpointer.write(1)
    n.io.deliver()  # the refusal is reported before the next slice
    n.checkpointer.write(None)
    outcome = n.checkpointer.finish()
    assert n.sends() == ["send events-state/1 b1", "send events-state/0 a"]
    assert outcome.committed == {0} and set(outcome.failed) == {1}


def test_a_checkpoint_in_slices_sends_and_commits_what_a_whole_one_does_while_events_go_on() -> None:
    """Events applied between slices change the table, not the snapshot: the next checkpoint has them."""
    def with_five_keys() -> Node:
        n = Node()
        for offset, (partition, key) in enumerate([(0, "a"), (1, "b"), (0, "c"), (1, "d"), (0, "e")]):
            n.step(partition, key, offset)
        return n

    whole, sliced = with_five_keys(), with_five_keys()
    expected = whole.checkpointer.checkpoint()
    sliced.checkpointer.begin()
    writes = 1
    sliced.step(0, "late", 9)
    while not sliced.checkpointer.write(2):
        writes += 1
        assert "flush" not in sliced.io.calls
    assert writes == 3 and sliced.checkpointer.finish() == expected
    assert sliced.io.calls == whole.io.calls and sliced.broker == whole.broker
    sliced.checkpointer.checkpoint()
    assert sliced.io.calls[len(whole.io.calls):] == ["send events-state/0 late", "flush", "commit events/0@10"]


def test_on_revoked_sends_everything_then_commits_and_forgets_the_revoked_partitions() -> None:
    n = Node()
    n.step(0, "a", 0)
    n.step(1, "b", 0)
    n.checkpointer.on_revoked({P0})
    assert n.io.calls == ["send events-state/0 a", "send events-state/1 b", "flush", "commit events/0@1 (async)"]
    assert n.broker.committed == {P0: 1} and n.io.done(P0) is None and n.io.pending() == {P1: 1}


def test_a_snapshot_under_way_does_not_commit_a_revoked_partition_again() -> None:
    """Its offsets are older than those the revocation committed: committing them would move the
    partition back, and its next owner would apply events twice."""
    n = Node()
    n.step(0, "a", 0)
    n.step(1, "b", 0)
    n.checkpointer.begin()
    n.step(0, "a", 1)
    n.checkpointer.on_revoked({P0})
    assert n.checkpointer.finish() == Outcome({1}, {})
    assert n.io.calls == ["send events-state/0 a", "send events-state/1 b", "send events-state/0 a", "flush",
                          "commit events/0@2 (async)", "flush", "commit events/1@1"]
    assert n.broker.committed == {P0: 2, P1: 1}


def test_forget_keeps_a_snapshot_under_way_from_committing_a_lost_partition() -> None:
    n = Node()
    n.step(0, "a", 0)
    n.step(1, "b", 0)
    n.checkpointer.begin()
    n.checkpointer.write(1)
    n.checkpointer.forget({P1})  # lost: another member owns it now
    n.io.forget({P1})
    n.checkpointer.write(None)
    assert n.checkpointer.finish() == Outcome({0}, {})
    assert n.io.calls[-1] == "commit events/0@1" and P1 not in n.broker.committed


# Restores.

def test_a_fresh_node_restores_a_partition_as_it_was_checkpointed() -> None:
    old = Node()
    for partition, key, offset in [(0, "a", 0), (1, "b", 0), (1, "c", 1), (1, "b", 2), (1, "d", 3)]:
        old.step(partition, key, offset, time_ms=1_000 + offset)
    old.checkpointer.checkpoint()
    new = Node(old.broker)
    new.io.rebalance(new, {P1})
    assert new.io.paused == {P1} and new.restorer.busy
    assert new.restore() > 1  # several changelog polls: the reader's batch is 2
    assert new.state(1) == old.state(1) and new.state(0) == {}
    assert new.state(1)["b"][2:] == (2, 2, 1_002)  # steps, offset, time
    # the new owner's marker goes to the changelog before the partition resumes: its records follow it
    assert new.io.calls == ["pause [1]", "send events-state/1 \x00streamlstm.owner", "resume [1]"]
    assert new.io.paused == set()
    assert new.reader.calls[0] == "start [(1, 0)]" and new.reader.calls[-1] == "stop [1]"
    assert new.restorer.restored_once and new.table.take_changes().changed.keys == []
    assert new.metrics.registry.get_sample_value("streamlstm_restored_keys_total", {"source": "changelog"}) == 3


def test_records_at_or_beyond_the_committed_offset_are_skipped_and_counted() -> None:
    """They describe events that will be consumed again: restoring them would apply those events twice."""
    old = Node()
    old.step(0, "a", 0)
    old.step(0, "b", 1)
    old.checkpointer.checkpoint()  # commits offset 2
    checkpointed = old.state(0)
    old.step(0, "a", 2)
    old.step(0, "b", 5)
    old.checkpointer.begin()
    old.checkpointer.write(None)
    old.io.deliver()  # the state records are in the changelog; the node dies before it commits
    new = Node(old.broker)
    new.assign({P0})
    assert new.state(0) == checkpointed
    assert new.skipped("beyond_cut") == 2 and new.skipped("incompatible") == 0


def test_a_zombies_late_record_of_an_older_offset_does_not_override_newer_state() -> None:
    broker = MemoryBroker()
    zombie, owner = Node(broker), Node(broker)
    zombie.step(0, "a", 0)  # a former owner, still running with the partition's older state
    owner.step(0, "a", 0)
    owner.step(0, "a", 1)
    owner.checkpointer.checkpoint()
    zombie.checkpointer.begin()
    zombie.checkpointer.write(None)
    zombie.io.deliver()  # written after the owner's record; its commit never happens
    assert changelog_offsets(broker, 0) == [("a", 1), ("a", 0)]
    new = Node(broker)
    new.assign({P0})
    assert new.state(0) == owner.state(0) != zombie.state(0)


def test_a_tombstone_below_the_cut_removes_the_key() -> None:
    old = Node()
    old.step(0, "a", 0)
    old.step(0, "b", 1)
    old.checkpointer.checkpoint()
    old.end(0, "a", 2)
    old.checkpointer.checkpoint()
    new = Node(old.broker)
    new.assign({P0})
    assert list(new.state(0)) == ["b"] and new.state(0) == old.state(0)


def serving_a_and_b() -> tuple[Node, dict[str, KeyState]]:
    """A node serving key a on P0 and b on P1, and a's state; the reader's calls so far forgotten."""
    n = Node()
    n.assign({P0, P1})
    n.step(0, "a", 0)
    n.step(1, "b", 0)
    n.reader.calls.clear()
    return n, n.state(0)


def test_a_partition_given_straight_back_keeps_its_state_without_reading_the_changelog() -> None:
    n, before = serving_a_and_b()
    n.assign({P0})  # P0 comes back at the offset its state stands at; P1 goes elsewhere
    assert n.reader.calls == []
    assert n.state(0) == before and n.state(1) == {} and n.io.paused == set()


def test_under_the_cooperative_protocol_a_partition_that_stays_is_neither_paused_nor_restored() -> None:
    n, before = serving_a_and_b()
    n.io.rebalance(n, {P0}, cooperative=True)  # P1 moves away, P0 is not revoked
    assert not n.restorer.busy and n.io.paused == set() and n.reader.calls == []
    assert n.state(0) == before and n.state(1) == {}
    n.step(0, "a", 1)
    n.io.rebalance(n, {P0, P1}, cooperative=True)  # P1 comes back: restored from its commit; P0 goes on
    assert n.io.paused == {P1}
    n.restore()
    assert n.state(0)["a"][3] == 1 and n.state(1)["b"][3] == 0
    assert n.restores("changelog") == 2 and n.restores("local") == 1  # both at first; now only P1


def test_a_partition_given_straight_back_but_not_committed_at_revocation_is_restored_from_its_commit() -> None:
    """Its state is ahead of where consumption resumes: keeping it would apply those events twice."""
    n = Node()
    n.assign({P0})
    n.step(0, "a", 0)
    n.checkpointer.checkpoint()
    committed = n.state(0)
    n.step(0, "a", 1)
    n.io.refuse(CHANGELOG, 0)  # the revocation's flush fails: P0 stays at offset 1
    n.reader.calls.clear()
    n.assign({P0})
    # from its local store, as of that commit, and the changelog after it (the marker, the checkpoint)
    assert n.broker.committed == {P0: 1} and n.reader.calls[0] == "start [(0, 2)]"
    assert n.state(0) == committed and n.restores("local") == 1


def test_state_of_another_shape_is_counted_incompatible_and_not_loaded() -> None:
    old = Node()
    old.step(0, "a", 0)
    old.step(0, "b", 1)
    old.checkpointer.checkpoint()
    new = Node(old.broker, layers=1)
    new.assign({P0})
    assert len(new.table) == 0 and new.skipped("incompatible") == 2
    assert new.metrics.registry.get_sample_value("streamlstm_restored_keys_total", {"source": "changelog"}) == 0


def test_rewind_drops_a_partitions_state_and_restores_it_from_its_committed_offset() -> None:
    n = Node()
    n.assign({P0, P1})
    n.step(0, "a", 0)
    n.step(1, "b", 0)
    n.checkpointer.checkpoint()
    committed, untouched = n.state(0), n.state(1)
    n.step(0, "a", 1)  # ahead of the commit: these events' records were refused
    n.step(0, "c", 2)
    n.io.positions[P0] = 3  # consumed up to here
    n.restorer.rewind({P0}, hold_s=0)
    assert n.state(0) == {} and n.io.pending() == {} and n.io.paused == {P0}
    n.reader.calls.clear()
    n.restore()
    assert n.reader.calls[0] == "start [(0, 2)]" and n.restores("local") == 1  # the local store, then the tail
    assert n.state(0) == committed and n.state(1) == untouched
    assert "rewind events/0" in n.io.calls and n.io.position(P0) == 1 and n.io.paused == set()


def test_a_rewind_waits_out_its_hold_before_restoring() -> None:
    n = Node()
    n.assign({P0})
    n.step(0, "a", 0)
    n.restorer.rewind({P0}, hold_s=60)
    n.reader.calls.clear()
    n.restorer.step()
    assert n.restorer.busy and n.io.paused == {P0} and n.reader.calls == [] and "rewind events/0" not in n.io.calls


def test_a_broker_that_does_not_answer_for_one_partition_holds_up_no_other_restore() -> None:
    class Flaky(MemoryTransport):
        answered = False

        def position(self, tp: TopicPartition) -> int | None:
            if tp == P1 and not self.answered:
                self.answered = True
                raise TransportError("timed out")
            return super().position(tp)

    n = Node()
    n.io = n.restorer.io = Flaky(KafkaConfig(input_topic=INPUT), n.broker)
    n.io.rebalance(n, {P0, P1})
    with pytest.raises(TransportError):
        n.restorer.step()
    for _ in range(10):
        n.restorer.step()
    assert not n.restorer.busy and n.io.paused == set()


# Local stores.

def served(events: list[tuple[str, int]]) -> Node:
    """A node that served P0 from its first assignment: `events` (key, offset), a checkpoint after each
    three; a key given offset -1 ends at the next offset."""
    n = Node()
    n.assign({P0})
    for i, (key, offset) in enumerate(events):
        if offset < 0:
            n.end(0, key, i)
        else:
            n.step(0, key, offset)
        if i % 3 == 2:
            n.checkpointer.checkpoint()
    n.checkpointer.checkpoint()
    return n


EVENTS = [("a", 0), ("b", 1), ("c", 2), ("a", 3), ("b", -1), ("d", 5), ("c", 6), ("e", 7)]


def from_changelog(broker: MemoryBroker, layers: int = LAYERS) -> Node:
    fresh = Node(broker, layers=layers)
    fresh.assign({P0})
    assert fresh.restores("changelog") == 1
    return fresh


def test_a_restart_loads_its_local_store_and_replays_only_the_changelog_written_after_it() -> None:
    n = served(EVENTS)
    expected = n.state(0)
    again = n.restarted()
    again.assign({P0})
    assert again.restores("local") == 1 and again.replayed("local") == 0  # nothing was written after it
    assert again.state(0) == expected == from_changelog(n.broker).state(0)


def test_a_store_left_behind_its_commit_catches_up_from_the_changelog_after_it(monkeypatch) -> None:
    """A kill -9 between the offset commit and the local write: the store is one checkpoint behind."""
    n = served(EVENTS)
    monkeypatch.setattr(n.stores, "submit", lambda *args: None)
    n.step(0, "a", 8)
    n.end(0, "c", 9)
    n.step(0, "f", 10)
    n.checkpointer.checkpoint()
    expected = n.state(0)
    again = n.restarted()
    again.assign({P0})
    assert again.restores("local") == 1 and again.replayed("local") == 3  # a, f and c's tombstone
    assert again.state(0) == expected == from_changelog(n.broker).state(0)


def test_changes_of_a_checkpoint_whose_commit_failed_reach_the_store_with_the_next_one(monkeypatch) -> None:
    """The next commit covers the failed one's offsets, and so must the store: it holds both's changes."""
    n = served(EVENTS)
    commit = n.io._commit

    def fails_once(offsets, wait):
        monkeypatch.setattr(n.io, "_commit", commit)
        raise TransportError("the coordinator moved")

    monkeypatch.setattr(n.io, "_commit", fails_once)
    n.step(0, "a", 8)
    n.checkpointer.checkpoint()  # not committed
    n.step(0, "f", 9)
    n.checkpointer.checkpoint()
    expected = n.state(0)
    again = n.restarted()
    again.assign({P0})
    assert again.restores("local") == 1 and again.replayed("local") == 0
    assert again.state(0) == expected == from_changelog(n.broker).state(0)


def test_changes_sent_when_partitions_are_revoked_reach_the_store_with_the_next_checkpoint() -> None:
    n = served(EVENTS)
    n.step(0, "g", 8)
    n.assign({P0})  # revoked (g's record sent, the offset committed) and given straight back: kept in memory
    n.step(0, "h", 9)
    n.checkpointer.checkpoint()
    expected = n.state(0)
    again = n.restarted()
    again.assign({P0})
    assert again.restores("local") == 1 and again.state(0) == expected


def flip_a_stored_value(path: Path) -> None:
    data = bytearray(path.read_bytes())
    at = data.index(b"SL\x01") + 100  # inside a state record's h
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def overwrite_the_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:100] = bytes(100)
    path.write_bytes(bytes(data))

def test_a_local_store_write_keeps_each_keys_last_entry_whatever_their_order(tmp_path) -> None:
    """Changes held at a revocation come before the next checkpoint's: a key changed then dropped is gone."""
    store = PartitionStore(tmp_path / "p0.sqlite")
    meta = StoreMeta("owner", 2, 3, "v1", 10, 20)
    store.write([("a", b"a1"), ("b", b"b1"), ("a", None), ("c", None), ("c", b"c1"), ("b", b"b2")], meta, replace=True)
    stored = store.read()
    assert stored is not None and dict(zip(stored.keys, stored.values)) == {"b": b"b2", "c": b"c1"}


@pytest.mark.parametrize("damage", [flip_a_stored_value, truncate, overwrite_the_header])
def test_a_damaged_local_store_is_refused_and_the_partition_restores_from_the_changelog(damage, caplog) -> None:
    n = served(EVENTS)
    expected = n.state(0)
    n.stores.close()  # its last connection: the write-ahead log is folded into the file
    damage(n.state_dir / f"{CHANGELOG}-0.sqlite")
    again = n.restarted()
    again.assign({P0})
    assert again.refused("damaged") == 1 and again.restores("changelog") == 1
    assert "partition 0: local store not used" in caplog.text
    assert again.state(0) == expected
    third = again.restarted()
    third.assign({P0})
    assert third.restores("local") == 1 and third.state(0) == expected  # rebuilt by that restore, and used again


def test_a_local_store_of_another_model_shape_is_refused() -> None:
    n = served(EVENTS)
    again = n.restarted(layers=1)
    again.assign({P0})
    assert again.refused("shape") == 1 and again.restores("changelog") == 1
    assert again.state(0) == from_changelog(n.broker, layers=1).state(0) == {}  # every record of the old shape


def test_a_local_store_of_a_partition_served_elsewhere_since_is_refused() -> None:
    """Its keys moved on elsewhere (one changed, one ended, one new): the store is stale, the changelog not."""
    a = served(EVENTS)
    b = Node(a.broker)
    b.assign({P0})
    b.step(0, "a", 8)
    b.end(0, "d", 9)
    b.step(0, "z", 10)
    b.checkpointer.checkpoint()
    back = a.restarted()
    back.assign({P0})
    assert back.refused("served_elsewhere") == 1 and back.restores("changelog") == 1
    assert back.state(0) == b.state(0)


def test_a_local_store_ahead_of_the_committed_offset_is_refused() -> None:
    """The group's offsets reset to an earlier one (kafka-consumer-groups --reset-offsets): the store holds
    state of events that will be consumed again."""
    n = served(EVENTS)
    n.broker.committed[P0] = 4
    again = n.restarted()
    again.assign({P0})
    assert again.refused("ahead") == 1 and again.restores("changelog") == 1
    assert again.state(0) == from_changelog(n.broker).state(0)
    assert max(state[3] for state in again.state(0).values()) < 4  # offsets of the events before the cut


# A shadow lane.

def test_one_checkpoint_writes_both_lanes_changelogs_before_its_one_commit() -> None:
    n = Node(shadow=("v2", 4))
    n.step(0, "a", 0)
    n.step(1, "b", 0)
    n.checkpointer.checkpoint()
    assert n.io.calls == ["send events-state/0 a", "send events-state/1 b", "send events-state-shadow/0 a",
                          "send events-state-shadow/1 b", "flush", "commit events/0@1 events/1@1"]


def test_a_partition_restores_both_lanes_each_from_its_changelog_and_resumes_once_both_have() -> None:
    n = Node(shadow=("v2", 4))
    for offset, key in enumerate("abcab"):
        n.step(0, key, offset)
    n.checkpointer.checkpoint()
    again = Node(n.broker, shadow=("v2", 4))
    assert again.assign({P0}) >= 1 and again.io.paused == set()
    assert again.state(0) == n.state(0) and again.state(0, lane=1) == n.state(0, lane=1)
    assert len(next(iter(again.state(0, lane=1).values()))[0][0]) == 4  # the shadow's own shape


def test_after_a_promotion_a_restore_takes_the_shadows_newer_state_and_writes_it_to_the_primary_changelog() -> None:
    """A crash after the served model became the shadow's version and before a checkpoint copied the
    shadow's state: the primary's changelog holds the old model's state; the restore takes the shadow's."""
    n = Node(shadow=("v2", 4))
    for offset, key in enumerate("abcab"):
        n.step(0, key, offset)
    n.checkpointer.checkpoint()
    promoted = n.restarted(hidden=4, version="v2")  # model.path now holds v2, model.shadow_path still does
    promoted.assign({P0})
    assert promoted.state(0) == n.state(0, lane=1) and promoted.state(0, lane=1) == {}  # the shadow is idle
    promoted.io.calls.clear()
    promoted.checkpointer.checkpoint()
    assert promoted.io.calls == ["send events-state/0 a", "send events-state/0 b", "send events-state/0 c", "flush",
                                 "commit"]
    later = promoted.restarted(shadow=None)  # the primary's changelog holds it now: no shadow needed
    later.assign({P0})
    assert later.state(0) == n.state(0, lane=1)
