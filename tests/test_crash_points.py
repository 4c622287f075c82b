"""kill -9 at the local stores' worst moments, at crash points (streamlstm/faults.py): the daemon kills
itself there, is restarted on the same state.dir, and every prediction still equals offline `predict`.
A file of its own so that the suite's workers share the broker tests evenly."""

from __future__ import annotations

import signal

import pytest
from conftest import daemon_metric, wait_until
from test_durable_state import REBALANCE_SESSION_MS, Feeder, assert_exact, make_events, predictions_by_source, prepare


@pytest.mark.parametrize("crash_at", ["store-write:30", "after-commit:6", "local-restore"])
def test_kill_9_at_the_local_stores_worst_moments_loses_nothing_and_applies_nothing_twice(
        tmp_path, broker, model_dir, daemon_factory, crash_at):
    """Killed in the middle of a local-store transaction, between an offset commit and its local write
    (the store one checkpoint behind), and while a partition is restored from its local store: restarted
    on the same state.dir, it uses the store (the torn transaction rolled back) and the changelog after it."""
    events = make_events(4_000, 300, seed=15)
    daemon = daemon_factory(kafka__session_timeout_ms=REBALANCE_SESSION_MS)
    prepare(daemon)
    daemon.start(crash_at=crash_at)  # no local store yet: a restore from one cannot crash this time
    feeder = Feeder(broker.bootstrap, daemon.topic, events, per_second=400)
    feeder.start()
    if crash_at == "local-restore":
        wait_until(lambda: feeder.sent > 1_500, 30, "events flowing")
        assert daemon.stop() == 0  # its final checkpoint fills the local stores
        daemon.start(crash_at=crash_at, wait_ready=False)
    daemon.wait_for_exit(30, f"the crash at {crash_at}")
    assert daemon.proc.returncode == -signal.SIGKILL
    daemon.start()
    feeder.join()
    found = predictions_by_source(broker, daemon.kafka["output_topic"], len(events))
    assert_exact(tmp_path, model_dir, events, found)
    assert daemon_metric(daemon, "streamlstm_restored_keys_total", '{source="local"}') > 0
    assert daemon_metric(daemon, "streamlstm_local_store_refused_total", '{reason="damaged"}') == 0
    assert daemon.stop() == 0
