"""A consumer that stops getting records while there are records to get must not look healthy; a
merely idle one must. Between the daemon and the broker, a TCP proxy that can stop forwarding on the
connections open at that moment (kept open, nothing delivered): a broker that stops delivering."""

import re
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import DaemonProcess, consume_exactly, daemon_metric, event_value, http_get, produce

from streamlstm.config import KafkaConfig
from streamlstm.demo.broker import EmbeddedBroker, free_port
from streamlstm.transport.admin import ensure_topics

STALL_TIMEOUT_S = 2.0
BACKLOG = 2000  # events of ~40 KB: 80 MB, more than librdkafka prefetches (64 MB), fetched ~1 MB a partition at a time
PADDING = b" " * 40_000


class PausingProxy:
    """Forwards 127.0.0.1:port to the broker. `pause(client_id)` freezes the connections that client has
    open (told by the client id in their first request): open, forwarding nothing either way, until
    `resume()`. Other clients' connections flow (the daemon's producer: a broker that stops delivering
    fetches, as a stuck partition leader or Tansu's S3 engine does)."""

    def __init__(self, port: int, target_port: int) -> None:
        self.port, self.target_port = port, target_port
        self._server = socket.create_server(("127.0.0.1", port))
        self._connections: list[_Connection] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:  # closed
                return
            connection = _Connection(client, socket.create_connection(("127.0.0.1", self.target_port)))
            self._connections.append(connection)
            connection.start()

    def pause(self, client_id: str) -> None:
        for connection in self._connections:
            if connection.client_id == client_id:
                connection.flowing.clear()

    def resume(self) -> None:
        for connection in self._connections:
            connection.flowing.set()

    def close(self) -> None:
        self.resume()
        self._server.close()
        for connection in self._connections:
            connection.close()


class _Connection:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client, self.upstream = client, upstream
        self.client_id: str | None = None
        self.flowing = threading.Event()
        self.flowing.set()

    def start(self) -> None:
        for src, dst in ((self.client, self.upstream), (self.upstream, self.client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        held = b""
        try:
            while data := src.recv(65536):
                if self.client_id is None and src is self.client and len(data) >= 14:
                    # a request: size, api key, api version, correlation id, then the client id (int16 length)
                    length = struct.unpack_from(">h", data, 12)[0]
                    self.client_id = data[14 : 14 + max(length, 0)].decode("utf-8", "replace")
                held += data
                self.flowing.wait()  # paused: what arrived is held back, the connection stays open
                dst.sendall(held)
                held = b""
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        for s in (self.client, self.upstream):
            s.close()


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedBroker, PausingProxy]]:
    """A broker that sends its clients to the proxy in front of it (it advertises the proxy's port)."""
    proxy_port = free_port()
    broker = EmbeddedBroker(log_file=tmp_path_factory.mktemp("broker") / "tansu.log", advertised_port=proxy_port)
    proxy = PausingProxy(proxy_port, broker.port)
    with broker:
        yield broker, proxy
    proxy.close()


def events(n: int, start: int, padding: bytes = b"") -> list[tuple[bytes, bytes]]:
    return [(f"k{i % 40}".encode(), event_value([i, 1, 2]) + padding) for i in range(start, start + n)]


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_stalled_consumer_fails_liveness_and_an_idle_one_stays_healthy(tmp_path, proxied, model_dir, client):
    broker, proxy = proxied
    daemon = DaemonProcess(tmp_path, broker, model_dir, kafka__client=client, kafka__session_timeout_ms=12000,
                           http__stall_timeout_s=STALL_TIMEOUT_S)  # the session outlasts the paused heartbeats
    ensure_topics(KafkaConfig(**daemon.kafka))
    produce(broker, daemon.topic, events(BACKLOG, 0, PADDING))
    try:
        # a backlog, and the broker stops delivering while the daemon knows there is more to fetch
        daemon.start(wait_ready=False)
        daemon.wait_for(lambda: sum(lag_of(daemon).values()) > 0, 60, "lag seen by the daemon")
        proxy.pause("streamlstm")  # the daemon's consumer (its producer is streamlstm-producer)
        daemon.wait_for(lambda: http_get(daemon.port, "/healthz")[0] == 503, 4 * STALL_TIMEOUT_S + 5,
                        "liveness failing")
        assert "fetching them again did not help" in http_get(daemon.port, "/healthz")[1]
        assert daemon_metric(daemon, "streamlstm_consumer_stalls_total") == 1
        assert len(re.findall(r"WARNING .*no records consumed for", daemon.log_file.read_text())) == 1

        # delivering again: every event predicted, healthy again
        proxy.resume()
        consume_exactly(broker, daemon.kafka["output_topic"], BACKLOG, timeout_s=90)
        daemon.wait_for(lambda: http_get(daemon.port, "/healthz")[0] == 200, 30, "liveness back")

        # idle, nothing to fetch: healthy however long it lasts (2.5 timeouts here)
        deadline = time.monotonic() + 2.5 * STALL_TIMEOUT_S
        while time.monotonic() < deadline:
            assert http_get(daemon.port, "/healthz")[0] == 200
        assert daemon_metric(daemon, "streamlstm_consumer_stalls_total") == 1
        assert daemon.stop() == 0
    finally:
        proxy.resume()
        daemon.kill()


def lag_of(daemon: DaemonProcess) -> dict[str, float]:
    text = http_get(daemon.port, "/metrics")[1]
    return {m[0]: float(m[1]) for m in re.findall(r'^streamlstm_consumer_lag\{[^}]*partition="(\d+)"[^}]*\} (\S+)$',
                                                   text, re.M)}
