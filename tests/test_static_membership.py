"""Static group membership (kafka.group_instance_id, KIP-345): a daemon restarted within the session
timeout gets its own partitions back and the rest of the group is not rebalanced.

Tansu holds every JoinGroup for half the session timeout, and only a member's first heartbeat counts as
contact, so a restart needs about half the session + 3 s: longer sessions here than the 6 s of the other
tests (benchmarks/tansu_membership.py, checks 1b and 1c).
"""

from __future__ import annotations

import pytest
import yaml
from conftest import daemon_metric, wait_until
from test_durable_state import Feeder, assert_exact, make_events, predictions_by_source, prepare

from streamlstm.config import load_config
from streamlstm.serving.supervisor import worker_config

SESSION_MS = 24_000  # a restart: half of it in JoinGroup, 3 s in SyncGroup, a heartbeat, ~4 s to start


def test_each_worker_is_a_static_member_of_its_own():
    """One instance id is one member: workers sharing one would share an assignment (Tansu does not fence)."""
    cfg = load_config(overrides=["kafka.group_instance_id=pod-0"], environ={})
    assert [worker_config(cfg, i).kafka.group_instance_id for i in range(2)] == ["pod-0-0", "pod-0-1"]
    assert worker_config(load_config(environ={}), 1).kafka.group_instance_id == ""


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_static_member_restarted_within_the_session_takes_its_partitions_back_alone(
        client, tmp_path, broker, model_dir, daemon_factory):
    first = daemon_factory(kafka__client=client, kafka__group_instance_id="a",
                           kafka__session_timeout_ms=SESSION_MS)
    prepare(first)
    other = first.replica()
    other.config["kafka"] = {**first.kafka, "group_instance_id": "b"}
    other.config_file.write_text(yaml.safe_dump(other.config))
    first.start(timeout_s=90)
    other.start(timeout_s=90)
    both_assigned = lambda: daemon_metric(first, "streamlstm_assigned_partitions") == 2 == daemon_metric(
        other, "streamlstm_assigned_partitions")  # noqa: E731
    wait_until(both_assigned, 60, "the partitions split two and two", first.log)
    rebalances = daemon_metric(other, "streamlstm_rebalances_total")

    events = make_events(3_000, 200, seed=7)
    feeder = Feeder(broker.bootstrap, first.topic, events, per_second=300)
    feeder.start()
    wait_until(lambda: feeder.sent > 1_000, 30, "a third of the events sent")
    assert first.stop() == 0
    assert "staying in the group as static member 'a'" in first.log()
    again = first.replica()  # the same instance id "a", a new process: as a pod restarted in place
    again.start(timeout_s=SESSION_MS / 1000 + 30)
    feeder.join()

    assert_exact(tmp_path, model_dir, events, predictions_by_source(broker, first.kafka["output_topic"], len(events)))
    assert daemon_metric(again, "streamlstm_assigned_partitions") == 2
    assert daemon_metric(other, "streamlstm_rebalances_total") == rebalances, "the other member was rebalanced"
    assert again.stop() == 0 and other.stop() == 0
