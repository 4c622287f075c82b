"""Shared fixtures: a real embedded broker, small models, and the daemon as a real subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

if not torch.cuda.is_available():
    # No GPU: the fused Triton kernel (streamlstm/fused_cell.py) runs in Triton's interpreter, on the CPU,
    # so its math is tested on every machine with Triton, not only when a GPU is lent. Triton reads this
    # when a kernel is defined, so it is set before any test module imports fused_cell.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from streamlstm.demo.broker import EmbeddedBroker, free_port
from streamlstm.model.artifact import save_artifact  # noqa: E402
from streamlstm.model.network import LSTMForecaster, ModelSpec

FEATURES = ("load", "temp", "hour")


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(log_file=tmp_path_factory.mktemp("broker") / "tansu.log") as b:
        yield b


def make_model(path: Path, hidden_size: int = 16, num_layers: int = 2, seed: int = 0,
               task: str = "regression", horizon: int = 1) -> Path:
    """An untrained but deterministic model: enough to compare streaming with offline. `horizon`: the
    train.horizon its artifact says it was trained for (what live accuracy scores at)."""
    torch.manual_seed(seed)
    outputs = ("load",) if task == "regression" else ("low", "mid", "high")
    spec = ModelSpec(task, FEATURES, outputs, hidden_size, num_layers, (10.0, 20.0, 12.0), (3.0, 5.0, 7.0),
                     (10.0,) if task == "regression" else (), (3.0,) if task == "regression" else ())
    config = {} if horizon == 1 else {"config": {"horizon": horizon}}
    save_artifact(LSTMForecaster(spec), path, {"note": "random weights for tests", **config})
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "model")


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


class DaemonProcess:
    """`streamlstm serve` in a subprocess, configured for one test's topics."""

    def __init__(self, tmp: Path, broker: EmbeddedBroker, model: Path, **overrides: object) -> None:
        self.tmp, self.broker, self.model = tmp, broker, model
        self.family = [self]  # this daemon and its replicas, for cleanup
        self.topic = unique("events")
        self.port = free_port()
        self.config = {
            "kafka": {"bootstrap_servers": broker.bootstrap, "input_topic": self.topic,
                      "output_topic": f"{self.topic}-out", "dlq_topic": f"{self.topic}-dlq",
                      "group_id": f"{self.topic}-group", "session_timeout_ms": 6000,
                      "heartbeat_interval_ms": 1000, "topic_partitions": 4,
                      # the default 20 ms: an idle daemon and the broker took ~20 % of a core in empty
                      # fetches (Tansu holds each for the whole wait), several daemons a test
                      "fetch_max_wait_ms": 100},
            "state": {"checkpoint_interval_ms": 200, "dir": str(tmp / f"{self.topic}-{self.port}-state")},
            "model": {"path": str(model), "device": "cpu"},
            "http": {"host": "127.0.0.1", "port": self.port},
        }
        for name, value in overrides.items():
            section, key = name.split("__")
            self.config.setdefault(section, {})[key] = value
        self.config_file = tmp / f"{self.topic}.yaml"
        self.config_file.write_text(yaml.safe_dump(self.config))
        self.log_file = tmp / f"{self.topic}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def kafka(self) -> dict:
        return self.config["kafka"]

    def replica(self) -> DaemonProcess:
        """Another daemon in the same group, on the same topics, with its own port and log."""
        other = DaemonProcess(self.tmp, self.broker, self.model)
        other.topic = self.topic
        other.config = {**self.config, "http": {**self.config["http"], "port": other.port},
                        "state": {**self.config["state"], "dir": str(self.tmp / f"{self.topic}-{other.port}-state")}}
        other.config_file = self.tmp / f"{unique('replica')}.yaml"
        other.config_file.write_text(yaml.safe_dump(other.config))
        other.log_file = other.config_file.with_suffix(".log")
        other.family = self.family
        self.family.append(other)
        return other

    def start(self, timeout_s: float = 60, wait_ready: bool = True, crash_at: str = "") -> DaemonProcess:
        """`crash_at`: a crash point (streamlstm/faults.py) where the daemon is to kill itself."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLSTM_")}
        if crash_at:
            env["STREAMLSTM_CRASH_AT"] = crash_at
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamlstm", "serve", "--config", str(self.config_file)],
            stdout=open(self.log_file, "ab"), stderr=subprocess.STDOUT, env=env)  # restarts append: a failure shows every run
        if wait_ready:
            self.wait_for(lambda: http_get(self.port, "/readyz")[0] == 200, timeout_s, "daemon ready")
        return self

    def wait_for(self, condition, timeout_s: float, what: str) -> None:
        def alive_and(condition=condition) -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) waiting for {what}:\n{self.log()}")
            return condition()

        wait_until(alive_and, timeout_s, what, self.log)

    def wait_for_exit(self, timeout_s: float, what: str) -> None:
        wait_until(lambda: self.proc.poll() is not None, timeout_s, what, self.log)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")[-5000:]

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_until(condition, timeout_s: float, what: str, context=lambda: "") -> None:
    """Poll a condition that an event will make true (a file, an HTTP answer, a metric)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}:\n{context()}")


def metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


def daemon_metric(daemon: DaemonProcess, name: str, labels: str = "") -> float:
    return metric(http_get(daemon.port, "/metrics")[1], name, labels)


@pytest.fixture
def daemon_factory(tmp_path: Path, broker: EmbeddedBroker, model_dir: Path):
    started: list[DaemonProcess] = []

    def factory(model: Path | None = None, **overrides: object) -> DaemonProcess:
        d = DaemonProcess(tmp_path, broker, model or model_dir, **overrides)
        started.append(d)
        return d

    yield factory
    for d in started:
        for member in d.family:
            member.kill()


class NotUtf8(str):
    """A header name that kafka-python's producer writes as bytes that are not UTF-8, as a producer in Go
    or C can (Kafka allows any bytes; Java clients read them leniently)."""

    def encode(self, *args: object, **kwargs: object) -> bytes:
        return b"\xff\xfe"


def produce(broker: EmbeddedBroker, topic: str, messages: list[tuple],
            compression_type: str | None = None, **client: object) -> None:
    """Messages as (key, value) or (key, value, headers). `client`: kafka-python settings replacing or adding
    to ours, e.g. another bootstrap and TLS (tests/tls_terminator.py), as in read_all and consume_exactly."""
    producer = KafkaProducer(**{"bootstrap_servers": broker.bootstrap, "linger_ms": 5,
                                "compression_type": compression_type} | client)
    for key, value, *headers in messages:
        producer.send(topic, key=key, value=value, headers=headers[0] if headers else None)
    producer.flush()
    producer.close()


def read_all(broker: EmbeddedBroker, topic: str, timeout_s: float = 30,
             isolation_level: str = "read_uncommitted", **client: object) -> list:
    """Every record of a topic up to its current end (fetch high watermarks), from the start."""
    consumer = KafkaConsumer(**{"bootstrap_servers": broker.bootstrap, "enable_auto_commit": False,
                                "isolation_level": isolation_level} | client)
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
    if not partitions:  # no such topic (yet)
        consumer.close()
        return []
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    records: list = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
        ends = [consumer.highwater(tp) for tp in partitions]
        if None not in ends and all(consumer.position(tp) >= end for tp, end in zip(partitions, ends)):
            break
    consumer.close()
    return records


def offline_predictions(tmp_path: Path, model: Path, events: list[dict],
                        settings: tuple[str, ...] = ()) -> dict[int, dict]:
    """`streamlstm predict` over the events (JSONL records with 'key' and a unique 'ts'), by ts; `settings`
    as its --set overrides."""
    data = tmp_path / f"{unique('offline')}.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in events))
    out = data.with_suffix(".out")
    overrides = [arg for setting in settings for arg in ("--set", setting)]
    subprocess.run([sys.executable, "-m", "streamlstm", "predict", "--model", str(model), "--data", str(data),
                    "--out", str(out), *overrides], check=True, timeout=120)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    return {p["event_ts"]: p for p in lines if "prediction" in p}


def assert_equals_offline(published: list, expected: dict[int, dict], topic: str) -> set[tuple[int, int]]:
    """Each published prediction is offline `predict`'s for the same event (by ts): same key, step and
    model, within 1e-5. Returns the (partition, offset) of the events predicted."""
    seen = set()
    worst = 0.0
    for record in published:
        p = json.loads(record.value)
        assert record.key.decode() == p["key"]
        want = expected[p["event_ts"]]
        assert (p["key"], p["step"]) == (want["key"], want["step"]), "prediction published for the wrong event"
        assert p["source"]["topic"] == topic and p["model_version"] == want["model_version"]
        worst = max(worst, max(abs(a - b) for a, b in zip(p["prediction"], want["prediction"])))
        seen.add((p["source"]["partition"], p["source"]["offset"]))
    assert worst <= 1e-5
    return seen


def consume_exactly(broker: EmbeddedBroker, topic: str, count: int, timeout_s: float = 60,
                    **client: object) -> list:
    """All records of a topic, read from the start; fails unless there are exactly `count`.

    The end is the fetch high watermark: Tansu 0.6 answers ListOffsets(latest) with wrong offsets.
    """
    consumer = KafkaConsumer(**{"bootstrap_servers": broker.bootstrap, "enable_auto_commit": False} | client)
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    records: list = []
    deadline = time.monotonic() + timeout_s
    while len(records) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
    for batch in consumer.poll(timeout_ms=300).values():  # anything beyond `count` is a duplicate
        records.extend(batch)
    ends = sum(consumer.highwater(tp) or 0 for tp in partitions)
    consumer.close()
    assert len(records) == count == ends, f"{topic}: expected {count} records, got {len(records)} " \
                                          f"(high watermarks sum to {ends})"
    return records


def event_value(features, ts: int | None = None) -> bytes:
    body = {"features": features}
    if ts is not None:
        body["ts"] = ts
    return json.dumps(body).encode()
