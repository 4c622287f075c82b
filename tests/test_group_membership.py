"""Rebalances that move nothing needlessly. Static group membership (kafka.group_instance_id, KIP-345):
a daemon restarted within the session timeout gets its own partitions back and the rest of the group is
not rebalanced. The cooperative-sticky assignor (kafka.assignor, KIP-429): when a member joins, only the
partitions that move are revoked.

Tansu holds every JoinGroup for half the session timeout, and only a member's first heartbeat counts as
contact, so a restart needs about half the session + 3 s: longer sessions here than the 6 s of the other
tests (benchmarks/tansu_membership.py, checks 1b and 1c).
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict

import pytest
import yaml
from conftest import daemon_metric, http_get, read_all, wait_until
from test_durable_state import Feeder, assert_exact, make_events, predictions_by_source, prepare

from streamlstm.config import load_config
from streamlstm.serving.supervisor import worker_config

SESSION_MS = 40_000  # a restart: half of it in JoinGroup, 3 s in SyncGroup, a heartbeat, 4-15 s to stop and start
# (a busy machine: at 32 s, 2 of 2 full-suite runs saw a member's session expire)


def test_each_worker_is_a_static_member_of_its_own():
    """One instance id is one member: workers sharing one would share an assignment (Tansu does not fence)."""
    cfg = load_config(overrides=["kafka.group_instance_id=pod-0"], environ={})
    assert [worker_config(cfg, i).kafka.group_instance_id for i in range(2)] == ["pod-0-0", "pod-0-1"]
    assert worker_config(load_config(environ={}), 1).kafka.group_instance_id == ""


def static_member(first, instance_id: str):
    """A daemon in `first`'s group with its own instance id (and its own port and state.dir)."""
    member = first.replica()
    member.config["kafka"] = {**first.kafka, "group_instance_id": instance_id}
    member.config_file.write_text(yaml.safe_dump(member.config))
    return member


def test_a_static_member_restarted_in_place_moves_no_partition_and_replays_no_changelog(
        tmp_path, broker, model_dir, daemon_factory):
    """One of two daemons stopped and started again on its own state.dir, back within the session (a pod
    of a rolling deploy): it takes its own partitions back from its local stores, and the other member is
    not rebalanced. On the default client only (each restart costs half a session here): librdkafka's
    static membership behaves the same on this broker (benchmarks/tansu_membership.py, checks 1c and 3a)."""
    first = daemon_factory(kafka__group_instance_id="a", kafka__session_timeout_ms=SESSION_MS)
    prepare(first)
    group = [first, static_member(first, "b")]
    for d in group:
        d.start(wait_ready=False)
    for d in group:
        d.wait_for(lambda d=d: http_get(d.port, "/metrics")[0] == 200, 30, "serving metrics")
    split = lambda: [daemon_metric(d, "streamlstm_assigned_partitions") for d in group] == [2, 2]  # noqa: E731
    wait_until(split, 90, "the partitions split between the two", first.log)
    for d in group:
        d.wait_for(lambda d=d: http_get(d.port, "/readyz")[0] == 200, 30, "ready")

    events = make_events(2_500, 300, seed=7)
    feeder = Feeder(broker.bootstrap, first.topic, events, per_second=100)
    feeder.start()
    wait_until(lambda: feeder.sent > 500, 30, "events flowing")
    held = assigned_partitions(first)
    assert first.stop() == 0
    assert "staying in the group as static member 'a'" in first.log()
    first.start(timeout_s=SESSION_MS / 1000 + 30)  # the same instance id and state.dir: a pod restarted in place
    feeder.join()

    assert_exact(tmp_path, model_dir, events, predictions_by_source(broker, first.kafka["output_topic"], len(events)))
    assert assigned_partitions(first) == held
    assert daemon_metric(first, "streamlstm_restores_total", '{source="changelog"}') == 0
    assert daemon_metric(first, "streamlstm_restores_total", '{source="local"}') == 2
    for d in group:
        assert daemon_metric(d, "streamlstm_rebalances_total") == 1, f"a member was rebalanced:\n{d.log()}"
    assert [d.stop() for d in group] == [0, 0]


def prediction_times(broker, topic: str) -> dict[int, list[float]]:
    """When each prediction was produced (its record's timestamp, in seconds), by the event's partition."""
    times: dict[int, list[float]] = defaultdict(list)
    for record in read_all(broker, topic):
        times[json.loads(record.value)["source"]["partition"]].append(record.timestamp / 1000)
    return {p: sorted(t) for p, t in times.items()}


def assigned_partitions(daemon) -> set[int]:
    """The partitions of the daemon's last assignment, from its log."""
    return set(map(int, re.findall(r"\d+", re.findall(r"assigned partitions \[([\d, ]*)\]", daemon.log_file.read_text())[-1])))


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_with_the_cooperative_assignor_a_member_joining_stops_only_the_partition_it_takes(
        client, tmp_path, broker, model_dir, daemon_factory):
    """librdkafka goes on serving the partitions that stay while the group rebalances; kafka-python revokes
    only the partition that moves too, but its poll() returns nothing while a JoinGroup is in flight, so
    there the partitions that stay pause for each round (benchmarks/tansu_membership.py, check 2b)."""
    first = daemon_factory(kafka__client=client, kafka__assignor="cooperative-sticky")
    prepare(first)
    group = [first, first.replica(), first.replica()]
    for d in group:
        d.start(wait_ready=False)
    for d in group:
        d.wait_for(lambda d=d: http_get(d.port, "/readyz")[0] == 200, 60, "ready")
    wait_until(lambda: sorted(daemon_metric(d, "streamlstm_assigned_partitions") for d in group) == [1, 1, 2], 60,
               "the partitions split among the three", first.log)

    events = make_events(6_000, 300, seed=8)
    feeder = Feeder(broker.bootstrap, first.topic, events, per_second=300)
    feeder.start()
    wait_until(lambda: feeder.sent > 1_500, 30, "events flowing")
    before = {i: assigned_partitions(d) for i, d in enumerate(group)}
    fourth = first.replica().start()
    feeder.join()

    assert_exact(tmp_path, model_dir, events, predictions_by_source(broker, first.kafka["output_topic"], len(events)))
    (moved,) = assigned_partitions(fourth)
    for i, d in enumerate(group):
        assert assigned_partitions(d) == before[i] - {moved}
        assert "state kept in memory" not in d.log_file.read_text(), "a partition that stays was revoked"
    if client == "confluent":
        times = prediction_times(broker, first.kafka["output_topic"])
        gap, start = max((b - a, a) for a, b in zip(times[moved], times[moved][1:]))
        assert gap > 2, f"partition {moved} moved in {gap:.1f} s: too fast to tell"
        for p, t in times.items():
            during = [x for x in t if start <= x <= start + gap]
            steps = [b - a for a, b in zip([start, *during], [*during, start + gap])]
            # eager, every partition stops for the whole rebalance; here the others keep being predicted
            # while it moves. How long one of them pauses in between depends on this broker's JoinGroup
            # rounds (the member giving `moved` up commits it synchronously on revocation, Kafka's pattern;
            # the others' commits and lag queries may wait behind a round), so the check is that they
            # flowed during the move and never stopped for all of it.
            assert p == moved or (during and max(steps) < gap), \
                f"partition {p} stopped for {max(steps):.1f} s of the {gap:.1f} s while {moved} moved"
    assert [d.stop() for d in [*group, fourth]] == [0, 0, 0, 0]
