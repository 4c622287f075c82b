"""serve.workers: 2 — two consumer processes in one `streamlstm serve`, against the real embedded broker:
as correct as one daemon, one HTTP port answering for both, a clean stop, and a pod that ends when a
worker dies."""

import json
import os
import random
import re
import signal
from pathlib import Path

from conftest import (
    assert_equals_offline,
    consume_exactly,
    daemon_metric,
    event_value,
    http_get,
    metric,
    offline_predictions,
    produce,
    wait_until,
)

from streamlstm.config import KafkaConfig, load_config
from streamlstm.serving.supervisor import worker_config
from streamlstm.transport.admin import ensure_topics

KEYS, EVENTS = 300, 3000


def running(pid: int) -> bool:
    """Alive: neither gone nor a zombie waiting to be reaped (an orphan's new parent may not reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def workers_of(pid: int) -> list[int]:
    """A `serve`'s worker processes: its spawned children (not multiprocessing's resource tracker)."""
    children = [int(child) for tasks in Path(f"/proc/{pid}/task").glob("*/children")
                for child in tasks.read_text().split()]
    return [child for child in children if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()]


def test_each_worker_serves_on_loopback_and_owns_its_transactional_id():
    exactly_once = load_config(overrides=["kafka.processing_guarantee=exactly_once", "kafka.transactional_id=tx"],
                               environ={})
    workers = [worker_config(exactly_once, index) for index in range(2)]
    assert [w.kafka.transactional_id for w in workers] == ["tx-0", "tx-1"]  # one would fence the other
    assert all((w.http.host, w.http.port) == ("127.0.0.1", 0) for w in workers)
    at_least_once = load_config(environ={})
    assert worker_config(at_least_once, 1).kafka == at_least_once.kafka


def test_two_workers_predict_as_offline_and_the_pod_reports_for_both(tmp_path, broker, model_dir, daemon_factory):
    rng = random.Random(5)
    good = [{"key": f"k-{rng.randrange(KEYS)}" if i >= KEYS else f"k-{i}",
             "features": [round(rng.gauss(10, 3), 4), round(rng.gauss(20, 5), 4), rng.randrange(24)],
             "ts": 1_700_000_000_000 + i} for i in range(EVENTS)]
    stream = [(e["key"].encode(), event_value(e["features"], e["ts"])) for e in good]
    daemon = daemon_factory(serve__workers=2)
    ensure_topics(KafkaConfig(**daemon.kafka))
    # Half before the start: the worker that joins first may take them all, and hand partitions (and
    # their keys' state) over when the second joins. Half once both are ready (each its own partitions).
    produce(broker, daemon.topic, stream[:EVENTS // 2])
    daemon.start()
    assert http_get(daemon.port, "/readyz") == (200, "ok: 2 workers\n")
    # torch (~270 MB) only in the workers: the supervisor checked the model in a child that has exited
    assert "libtorch" not in Path(f"/proc/{daemon.proc.pid}/maps").read_text()
    produce(broker, daemon.topic, stream[EVENTS // 2:])

    published = consume_exactly(broker, daemon.kafka["output_topic"], EVENTS)
    seen = assert_equals_offline(published, offline_predictions(tmp_path, model_dir, good), daemon.topic)
    assert len(seen) == EVENTS and len({part for part, _ in seen}) == 4

    # The pod's /metrics: the workers' values added up, under the single-daemon names.
    daemon.wait_for(lambda: daemon_metric(daemon, "streamlstm_checkpoints_total") >= 2, 10, "checkpoints")
    text = http_get(daemon.port, "/metrics")[1]
    assert metric(text, "streamlstm_events_consumed_total") == EVENTS
    assert metric(text, "streamlstm_predictions_produced_total") == EVENTS
    assert metric(text, "streamlstm_step_batch_size_sum") == EVENTS
    assert metric(text, "streamlstm_assigned_partitions") == 4
    assert metric(text, "streamlstm_live_keys") == KEYS
    assert re.search(r'^streamlstm_model_info\{.*version="[0-9a-f]{16}"\} 1\.0$', text, re.MULTILINE)
    last = dict(re.findall(r"worker-(\d) streamlstm\.daemon: assigned partitions \[(.*)\]", daemon.log()))
    assert set(last) == {"0", "1"} and all(last.values()), f"each worker ends with partitions: {last}"
    assert http_get(daemon.port, "/healthz") == (200, "ok: 2 workers\n")
    # GET /keys through the pod's port: the worker holding the key answers; nobody holds "nobody"
    status, body = http_get(daemon.port, "/keys/k-0")
    assert status == 200 and json.loads(body)["steps"] == sum(e["key"] == "k-0" for e in good), body
    assert http_get(daemon.port, "/keys/nobody")[0] == 404

    assert daemon.stop(signal.SIGTERM) == 0
    log = daemon.log()
    assert "Traceback" not in log and log.count("streamlstm.daemon: stopped") == 2


def test_a_worker_that_dies_ends_the_pod_with_an_error(daemon_factory):
    daemon = daemon_factory(serve__workers=2).start()
    workers = workers_of(daemon.proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    assert daemon.proc.wait(timeout=30) == 1
    log = daemon.log()
    assert re.search(rf"worker \d \(pid {workers[1]}\) exited unexpectedly with code -9", log), log
    assert "streamlstm.daemon: stopped" in log and not Path(f"/proc/{workers[0]}").exists()  # the other, cleanly


def test_workers_stop_cleanly_when_their_supervisor_is_killed(daemon_factory):
    """SIGKILL to the supervisor (or the OOM killer): no orphan keeps consuming beside its replacement."""
    daemon = daemon_factory(serve__workers=2).start()
    workers = workers_of(daemon.proc.pid)
    assert len(workers) == 2
    daemon.proc.kill()
    daemon.proc.wait()
    wait_until(lambda: not any(map(running, workers)), 30, "the workers to exit", daemon.log)
    log = daemon.log()
    assert log.count(f"the supervisor (pid {daemon.proc.pid}) is gone; stopping") == 2, log
    assert log.count("streamlstm.daemon: stopped") == 2 and "Traceback" not in log, log  # a last checkpoint each
