"""The daemon end to end, against the real embedded broker, as a real subprocess."""

import json
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import (
    DaemonProcess,
    consume_exactly,
    event_value,
    http_get,
    metric,
    offline_predictions,
    produce,
)

from streamlstm.config import KafkaConfig
from streamlstm.kafka_io import DLQ_REASON, DLQ_SOURCE, ensure_topics

KEYS, GOOD_EVENTS = 320, 6400

BAD_VALUES = {  # reason -> a malformed value (keys are fine unless the reason is about the key)
    "not_json": b'{"features": [1, 2',
    "not_utf8": b"\xff\xfe\xfd",
    "not_object": b"[1, 2, 3]",
    "missing_features": b'{"ts": 1}',
    "wrong_feature_count": b'{"features": [1, 2]}',
    "unknown_feature": b'{"features": {"load": 1, "temp": 2, "hour": 3, "wind": 4}}',
    "non_finite_feature": b'{"features": [1, NaN, 3]}',
    "non_numeric_feature": b'{"features": [1, "warm", 3]}',
    "value_too_large": b'{"features": [1, 2, 3]}' + b" " * 70_000,  # events.max_value_bytes: 65536
}


def workload(seed: int = 3):
    """Good events of KEYS keys, interleaved, each with a unique ts; bad events sprinkled among them."""
    rng = random.Random(seed)
    good, stream = [], []
    for i in range(GOOD_EVENTS):
        key = f"meter-{rng.randrange(KEYS)}" if i >= KEYS else f"meter-{i}"
        features = [round(rng.gauss(10, 3), 4), round(rng.gauss(20, 5), 4), rng.randrange(24)]
        good.append({"key": key, "features": features, "ts": 1_700_000_000_000 + i})
        stream.append((key.encode(), event_value(features, 1_700_000_000_000 + i)))
        if i % 10 == 5:
            reason = rng.choice(sorted(BAD_VALUES))
            stream.append((key.encode(), BAD_VALUES[reason]))
    stream.append((None, event_value([1, 2, 3])))  # no key at all
    stream.append((b"k" * 2000, event_value([1, 2, 3])))  # events.max_key_bytes: 1024
    return good, stream


def test_streaming_equals_offline_and_rejections_change_nothing(tmp_path, broker, model_dir, daemon_factory):
    good, stream = workload()
    daemon = daemon_factory()
    ensure_topics(KafkaConfig(**daemon.kafka))
    produce(broker, daemon.topic, stream)  # all before the daemon starts: polls hold keys many times
    daemon.start()

    published = consume_exactly(broker, daemon.kafka["output_topic"], GOOD_EVENTS)
    bad = len(stream) - GOOD_EVENTS
    dead = consume_exactly(broker, daemon.kafka["dlq_topic"], bad)

    expected = offline_predictions(tmp_path, model_dir, good)
    seen = set()
    worst = 0.0
    for record in published:
        p = json.loads(record.value)
        assert record.key.decode() == p["key"]
        want = expected[p["event_ts"]]
        assert (p["key"], p["step"]) == (want["key"], want["step"]), "prediction published for the wrong event"
        assert p["source"]["topic"] == daemon.topic and p["model_version"] == want["model_version"]
        worst = max(worst, max(abs(a - b) for a, b in zip(p["prediction"], want["prediction"])))
        seen.add((p["source"]["partition"], p["source"]["offset"]))
    assert worst <= 1e-5
    assert len(seen) == GOOD_EVENTS and len({part for part, _ in seen}) == 4

    reasons = Counter(dict(r.headers)[DLQ_REASON].decode() for r in dead)
    originals = Counter(r.value for r in dead)
    assert reasons["bad_key"] == reasons["key_too_large"] == 1
    assert set(reasons) - {"bad_key", "key_too_large"} == set(BAD_VALUES)
    assert all(originals[v] == reasons[r] for r, v in BAD_VALUES.items())  # bytes untouched
    assert all(dict(r.headers)[DLQ_SOURCE].decode().startswith(daemon.topic + "/") for r in dead)

    daemon.wait_for(lambda: metric(http_get(daemon.port, "/metrics")[1], "streamlstm_checkpoints_total") > 0,
                    10, "a checkpoint")
    text = http_get(daemon.port, "/metrics")[1]
    assert metric(text, "streamlstm_events_consumed_total") == len(stream)
    assert metric(text, "streamlstm_predictions_produced_total") == GOOD_EVENTS
    for reason, count in reasons.items():
        assert metric(text, "streamlstm_events_rejected_total", f'{{reason="{reason}"}}') == count
    assert metric(text, "streamlstm_live_keys") == KEYS
    assert metric(text, "streamlstm_assigned_partitions") == 4
    assert metric(text, "streamlstm_step_batch_size_sum") == GOOD_EVENTS
    # more steps than polls: some polls held a key several times and advanced it in successive steps
    assert metric(text, "streamlstm_step_batch_size_count") > metric(text, "streamlstm_poll_records_count")
    assert 'streamlstm_model_info{' in text and "streamlstm_prediction_latency_seconds_bucket" in text
    assert http_get(daemon.port, "/healthz") == (200, "ok\n")
    assert http_get(daemon.port, "/readyz")[0] == 200

    assert daemon.stop(signal.SIGTERM) == 0
    assert "Traceback" not in daemon.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signals_end_the_daemon_cleanly_and_commit(broker, daemon_factory, sig):
    daemon = daemon_factory().start()
    produce(broker, daemon.topic, [(b"k1", event_value([1, 2, 3])), (b"k2", event_value([4, 5, 6]))])
    consume_exactly(broker, daemon.kafka["output_topic"], 2)
    assert daemon.stop(sig) == 0
    log = daemon.log()
    assert "Traceback" not in log and "stopped" in log

    again = daemon.replica().start()  # same group, same topics: a clean stop committed everything
    produce(broker, daemon.topic, [(b"k3", event_value([1, 1, 1]))])
    assert len(consume_exactly(broker, daemon.kafka["output_topic"], 3)) == 3
    assert again.stop() == 0


def test_readyz_is_false_until_partitions_are_assigned(daemon_factory):
    daemon = daemon_factory(kafka__session_timeout_ms=6000)
    daemon.start()  # start() waits for /readyz == 200; before assignment it must have been 503
    assert re.search(r"assigned partitions \[0, 1, 2, 3\]", daemon.log())
    assert daemon.stop() == 0


def test_broker_command_stops_cleanly_and_leaves_no_process(tmp_path):
    from streamlstm.broker import free_port

    port = free_port()
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen([sys.executable, "-m", "streamlstm", "broker", "--port", str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip().endswith(f"127.0.0.1:{port}")
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
        assert "Traceback" not in proc.stderr.read()
        assert not [p for p in Path("/proc").glob("[0-9]*/cmdline")
                    if f"127.0.0.1:{port}".encode() in _read(p)], "tansu still running"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def test_a_daemon_started_before_its_broker_waits_alive_and_serves_when_it_appears(tmp_path, model_dir):
    """Broker down at start for 10 s: no crash, /healthz 200 and /readyz 503 meanwhile, then serving."""
    from streamlstm.broker import EmbeddedBroker, free_port

    port = free_port()
    absent = EmbeddedBroker(port, log_file=tmp_path / "late-broker.log")
    daemon = DaemonProcess(tmp_path, absent, model_dir)
    try:
        daemon.start(wait_ready=False)
        daemon.wait_for(lambda: http_get(daemon.port, "/healthz")[0] == 200, 30, "the http endpoints")
        assert http_get(daemon.port, "/readyz")[0] == 503
        time.sleep(10)  # the scenario: the broker stays away for 10 s
        assert http_get(daemon.port, "/healthz")[0] == 200 and http_get(daemon.port, "/readyz")[0] == 503
        with absent as broker:
            daemon.wait_for(lambda: http_get(daemon.port, "/readyz")[0] == 200, 90, "ready once the broker is up")
            produce(broker, daemon.topic, [(b"late", event_value([1, 2, 3]))])
            assert json.loads(consume_exactly(broker, daemon.kafka["output_topic"], 1)[0].value)["step"] == 1
            assert daemon.stop() == 0
    finally:
        daemon.kill()
