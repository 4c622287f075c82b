"""Durable per-key state against the real embedded broker: crashes, rebalances, restarts, restore,
reset/end control events and expiry. The reference is always `streamlstm predict` over each key's whole
event sequence: a lost or doubled state step changes every later prediction of that key."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict

import pytest
from conftest import (
    daemon_metric,
    event_value,
    http_get,
    offline_predictions,
    produce,
    read_all,
    unique,
    wait_until,
)
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic

from streamlstm.config import KafkaConfig, StateConfig
from streamlstm.state import changelog
from streamlstm.transport.admin import ensure_changelog, ensure_topics

BASE_TS = 1_700_000_000_000
# A killed or frozen daemon holds its partitions until its session expires, and the group's join then
# waits about half a session on Tansu: the tests where members die use the shortest session that keeps
# rebalances reliable, so each death costs seconds, not ten.
REBALANCE_SESSION_MS = 3000


def make_events(n: int, keys: int, seed: int) -> list[dict]:
    """Events of `keys` keys in random interleaving, each with a unique ts that identifies it."""
    rng = random.Random(seed)
    return [{"key": f"k{rng.randrange(keys) if i >= keys else i}",
             "features": [round(rng.gauss(10, 3), 3), round(rng.gauss(20, 5), 3), rng.randrange(24)],
             "ts": BASE_TS + i} for i in range(n)]


class Feeder(threading.Thread):
    """Produces events at a steady pace in the background, so daemons die mid-stream."""

    def __init__(self, bootstrap: str, topic: str, events: list[dict], per_second: float) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.events, self.per_second = bootstrap, topic, events, per_second
        self.sent = 0

    def run(self) -> None:
        producer = KafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5)
        started, chunk = time.monotonic(), max(int(self.per_second / 20), 1)
        for start in range(0, len(self.events), chunk):
            for e in self.events[start : start + chunk]:
                producer.send(self.topic, key=e["key"].encode(), value=event_value(e["features"], e["ts"]))
            self.sent = start + chunk
            time.sleep(max(started + self.sent / self.per_second - time.monotonic(), 0))
        producer.flush()
        producer.close()


def prepare(daemon) -> None:
    kafka = KafkaConfig(**daemon.kafka)
    ensure_topics(kafka)
    ensure_changelog(kafka, StateConfig().changelog_for(kafka))


def stop_together(*daemons) -> list[int]:
    """SIGTERM to all, then their exit codes: one by one, each leaving would rebalance the others first."""
    for d in daemons:
        d.proc.send_signal(signal.SIGTERM)
    return [d.proc.wait(timeout=30) for d in daemons]


def predictions_by_source(broker, topic: str, expected: int, timeout_s: float = 120,
                          isolation_level: str = "read_uncommitted") -> dict[int, list[dict]]:
    """Every prediction published, grouped by the event's ts, once all `expected` events have one."""
    found: dict[int, list[dict]] = {}

    def complete() -> bool:
        found.clear()
        for record in read_all(broker, topic, isolation_level=isolation_level):
            p = json.loads(record.value)
            found.setdefault(p["event_ts"], []).append(p)
        return len(found) >= expected

    wait_until(complete, timeout_s, f"a prediction for each of {expected} events",
               lambda: f"{len(found)} events predicted")
    return found


def assert_exact(tmp_path, model_dir, events: list[dict], found: dict[int, list[dict]],
                 predicted: set[int] | None = None) -> int:
    """Every event predicted (or those whose ts are in `predicted`); every prediction of it (duplicates
    included) at the event's own step count and equal to offline over the keys' whole sequences within
    1e-5, so no step was applied twice or lost.

    Duplicates are recomputations after a crash; in a batch of another size the CPU's matmul may round
    the last bit differently (batches of 1 to 3 rows take another kernel), hence 1e-5 and not ==.
    Returns how many duplicates there were.
    """
    expected = offline_predictions(tmp_path, model_dir, events)
    step_of = {}
    counts: dict[str, int] = defaultdict(int)
    for e in events:
        counts[e["key"]] += 1
        step_of[e["ts"]] = (e["key"], counts[e["key"]])
    assert set(found) == (set(step_of) if predicted is None else predicted), "events without a prediction"
    duplicates = 0
    for ts, predictions in found.items():
        duplicates += len(predictions) - 1
        want = expected[ts]["prediction"]
        for p in predictions:
            assert (p["key"], p["step"]) == step_of[ts], f"event {ts}: {p['key']} step {p['step']}, expected {step_of[ts]}"
            assert max(abs(a - b) for a, b in zip(p["prediction"], want)) <= 1e-5, (p, want)
    return duplicates


@pytest.mark.parametrize("guarantee,state_dir,resident", [("at_least_once", "kept", 100), ("exactly_once", "kept", 0),
                                                          ("at_least_once", "new", 0)])
def test_kill_9_at_random_moments_loses_nothing_and_applies_nothing_twice(tmp_path, broker, model_dir,
                                                                            daemon_factory, guarantee, state_dir,
                                                                            resident):
    """Restarted on the same state.dir (its local stores, torn or behind, and the changelog after them)
    or as a new pod (the whole changelog); `resident`: state.max_resident_keys, a quarter of the keys,
    so keys are evicted to the local stores and fetched back all along."""
    events = make_events(3_000, 400, seed=11)
    bound = {"state__max_resident_keys": resident, "kafka__max_poll_records": resident} if resident else {}
    daemon = daemon_factory(kafka__processing_guarantee=guarantee, kafka__transactional_id=unique("txn"),
                            kafka__session_timeout_ms=REBALANCE_SESSION_MS, **bound)
    prepare(daemon)
    feeder = Feeder(broker.bootstrap, daemon.topic, events, per_second=250)  # about as long as 4 kills
    rng = random.Random(5)
    daemon.start()
    feeder.start()
    kills, fetched = 0, 0.0
    while feeder.is_alive() or kills < 4:
        if feeder.is_alive():  # each life dies mid-work, not while it still joins the group or restores
            working = lambda d=daemon: daemon_metric(d, "streamlstm_predictions_produced_total") > 0  # noqa: E731
            wait_until(lambda: not feeder.is_alive() or working(), 60, "predictions from this run", daemon.log)
        time.sleep(rng.uniform(0.3, 1.5))
        fetched += daemon_metric(daemon, "streamlstm_fetched_keys_total", '{result="hit"}')
        daemon.kill()  # SIGKILL: no checkpoint, no leaving the group
        kills += 1
        daemon = (daemon if state_dir == "kept" else daemon.replica()).start()
    committed = "read_committed" if guarantee == "exactly_once" else "read_uncommitted"
    found = predictions_by_source(broker, daemon.kafka["output_topic"], len(events), isolation_level=committed)
    duplicates = assert_exact(tmp_path, model_dir, events, found)
    source = '{source="local"}' if state_dir == "kept" else '{source="changelog"}'
    assert kills >= 4 and daemon_metric(daemon, "streamlstm_restored_keys_total", source) > 0
    if resident:
        assert fetched > 0 and daemon_metric(daemon, "streamlstm_live_keys") <= resident
    # At least once, whether a kill leaves delivered but uncommitted predictions (repeated after the
    # restart) is down to timing: 0 repeats were seen under load, so they are not required.
    if guarantee == "exactly_once" and duplicates:
        pytest.xfail(f"{duplicates} duplicates from aborted transactions reached a read_committed consumer: "
                     "Tansu 0.6.0 sends no aborted_transactions in fetch responses "
                     "(benchmarks/tansu_transactions.py, checks 3a and 7b)")


def test_rebalances_as_daemons_die_and_join_keep_state_exact(tmp_path, broker, model_dir, daemon_factory):
    events = make_events(8_000, 500, seed=12)
    first = daemon_factory(kafka__session_timeout_ms=REBALANCE_SESSION_MS)
    prepare(first)
    group = [first.start(), first.replica().start(), first.replica().start()]
    feeder = Feeder(broker.bootstrap, first.topic, events, per_second=500)
    feeder.start()
    wait_until(lambda: feeder.sent > 2_000, 30, "a quarter of the events sent")
    group[1].kill()
    wait_until(lambda: feeder.sent > 4_500, 30, "more events sent")
    group.append(first.replica().start())
    feeder.join()
    found = predictions_by_source(broker, first.kafka["output_topic"], len(events))
    assert_exact(tmp_path, model_dir, events, found)
    assert daemon_metric(group[0], "streamlstm_rebalances_total") >= 4  # start, two joins, a death, a join
    assert stop_together(group[0], group[2], group[3]) == [0, 0, 0]


@pytest.mark.parametrize("state_dir", ["new", "kept"])
def test_sigterm_then_restart_repeats_nothing_and_state_carries_over(tmp_path, broker, model_dir, daemon_factory,
                                                                     state_dir):
    """As a new pod, the state comes from the changelog; on the same state.dir, from the local stores,
    where the final checkpoint is: no changelog record is replayed."""
    events = make_events(3_000, 200, seed=13)
    daemon = daemon_factory()
    prepare(daemon)
    daemon.start()
    as_messages = [(e["key"].encode(), event_value(e["features"], e["ts"])) for e in events]
    produce(broker, daemon.topic, as_messages[:1_500])
    predictions_by_source(broker, daemon.kafka["output_topic"], 1_500)
    assert daemon.stop(signal.SIGTERM) == 0
    assert "Traceback" not in daemon.log()
    again = (daemon.replica() if state_dir == "new" else daemon).start()
    produce(broker, daemon.topic, as_messages[1_500:])
    found = predictions_by_source(broker, daemon.kafka["output_topic"], len(events))
    assert assert_exact(tmp_path, model_dir, events, found) == 0
    source = "changelog" if state_dir == "new" else "local"
    assert daemon_metric(again, "streamlstm_restored_keys_total", f'{{source="{source}"}}') == 200
    if state_dir == "kept":
        assert daemon_metric(again, "streamlstm_restores_total", '{source="changelog"}') == 0
        assert daemon_metric(again, "streamlstm_restore_replayed_records_total", '{source="local"}') == 0
    assert again.stop() == 0


def test_restore_pauses_only_the_partition_being_restored(broker, daemon_factory):
    """Partition 0's changelog is long; partition 1's events are predicted while it is still read."""
    daemon = daemon_factory()
    prepare(daemon)
    topic = StateConfig().changelog_for(KafkaConfig(**daemon.kafka))
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=20, batch_size=262_144)
    for i in range(150_000):  # records beyond any committed offset: read, then skipped
        producer.send(topic, key=f"old-{i % 5000}".encode(), value=None, partition=0,
                      headers=changelog.tombstone_headers(10**9))
    for i in range(200):
        producer.send(daemon.topic, key=f"p1-{i}".encode(), value=event_value([1, 2, 3]), partition=1)
        producer.send(daemon.topic, key=f"p0-{i}".encode(), value=event_value([1, 2, 3]), partition=0)
    producer.flush()
    producer.close()

    daemon.start(wait_ready=False)  # ready only after the restore
    daemon.wait_for(lambda: http_get(daemon.port, "/metrics")[0] == 200
                    and daemon_metric(daemon, "streamlstm_predictions_produced_total") >= 200, 60,
                    "partition 1's predictions")
    assert daemon_metric(daemon, "streamlstm_restoring_partitions") >= 1, "partition 0 finished restoring too soon"
    assert http_get(daemon.port, "/readyz")[0] == 503
    assert daemon_metric(daemon, "streamlstm_predictions_produced_total") == 200
    sources = {json.loads(r.value)["source"]["partition"] for r in read_all(broker, daemon.kafka["output_topic"])}
    assert sources == {1}
    daemon.wait_for(lambda: daemon_metric(daemon, "streamlstm_predictions_produced_total") == 400, 60,
                    "partition 0's predictions after its restore")
    assert daemon_metric(daemon, "streamlstm_restore_skipped_records_total", '{reason="beyond_cut"}') == 150_000
    assert daemon.stop() == 0


def test_a_changelog_with_another_partition_count_stops_startup_naming_it(broker, daemon_factory):
    daemon = daemon_factory()
    kafka = KafkaConfig(**daemon.kafka)
    ensure_topics(kafka)  # 4 partitions
    changelog_topic = StateConfig().changelog_for(kafka)
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    admin.create_topics([NewTopic(changelog_topic, 2, 1)])
    admin.close()
    result = subprocess.run([sys.executable, "-m", "streamlstm", "serve", "--config", str(daemon.config_file)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert f"changelog topic {changelog_topic!r} has 2 partitions but input topic" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_daemon_frozen_past_its_session_loses_its_partitions_and_rejoins_without_harm(
        tmp_path, broker, model_dir, daemon_factory):
    """SIGSTOP longer than the session timeout: the group moves the frozen daemon's partitions on; when
    it thaws it finds them lost, drops their state without committing, and rejoins — a zombie that
    must not corrupt anything."""
    events = make_events(4_000, 400, seed=14)
    first = daemon_factory(kafka__session_timeout_ms=REBALANCE_SESSION_MS)
    prepare(first)
    frozen, other = first.start(), first.replica().start()
    feeder = Feeder(broker.bootstrap, first.topic, events, per_second=400)
    feeder.start()
    wait_until(lambda: feeder.sent > 1_000, 30, "events flowing")
    frozen.proc.send_signal(signal.SIGSTOP)
    other.wait_for(lambda: daemon_metric(other, "streamlstm_assigned_partitions") == 4, 30,
                   "the other daemon taking every partition")
    frozen.proc.send_signal(signal.SIGCONT)
    feeder.join()
    found = predictions_by_source(broker, first.kafka["output_topic"], len(events))
    assert_exact(tmp_path, model_dir, events, found)
    frozen.wait_for(lambda: daemon_metric(frozen, "streamlstm_assigned_partitions") > 0, 30, "rejoining")
    assert daemon_metric(frozen, "streamlstm_partitions_lost_total") > 0
    assert stop_together(frozen, other) == [0, 0]


def test_a_changelog_partition_restarted_while_another_is_read_is_read_to_its_new_end(broker):
    """A partition's restore cancelled and begun again at the same offset (a rebalance in the middle of
    it) while the reader goes on with another: it reads to the partition's end as it is now."""
    from streamlstm.transport.readers import ChangelogReader

    topic = unique("changelog")
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    admin.create_topics([NewTopic(topic, 2, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)

    def write(partition: int, count: int) -> None:
        for _ in range(count):
            producer.send(topic, key=b"k", value=b"v", partition=partition)
        producer.flush()

    write(0, 3)
    write(1, 3)
    reader = ChangelogReader(KafkaConfig(bootstrap_servers=broker.bootstrap), topic)
    reader.start({0: 0, 1: 0})
    wait_until(lambda: (reader.poll(50), 0 in reader.caught_up())[1], 30, "partition 0 read")
    reader.stop({0})
    write(0, 2)
    reader.start({0: 0})
    seen: list = []
    wait_until(lambda: (seen.extend(r for r in reader.poll(50) if r.partition == 0), 0 in reader.caught_up())[1],
               30, "partition 0 read again")
    assert len(seen) == 5
    reader.close()
    producer.close()
