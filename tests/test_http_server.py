"""The HTTP port against hostile clients: hanging, garbage and huge requests cost the daemon neither threads
nor memory, and the probes and scrapes beside them are answered at once."""

from __future__ import annotations

import resource
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import http_get
from test_durable_state import Feeder, assert_exact, make_events, predictions_by_source, prepare

from streamlstm.serving import http_server
from streamlstm.serving.http_server import MAX_CONNECTIONS, MAX_HEADER_BYTES, MAX_REQUEST_LINE, HttpServer


@pytest.fixture
def server() -> Iterator[HttpServer]:
    s = HttpServer("127.0.0.1", 0, lambda: b"up 1\n", lambda: (True, "alive"), lambda: (False, "not assigned"))
    s.start()
    yield s
    s.stop()


def exchange(port: int, request: bytes) -> bytes:
    """What the server answers to `request`, up to its close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def open_files(limit: int) -> None:
    """Room for `limit` sockets in this process (the soft limit is often 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < limit:
        if hard != resource.RLIM_INFINITY and hard < limit:
            pytest.skip(f"needs {limit} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


class Attack:
    """Hostile clients: `hanging` that send half a request and wait, garbage, and headers of a megabyte."""

    def __init__(self, port: int, hanging: int) -> None:
        self.port, self.sockets = port, []
        for _ in range(hanging):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            self.sockets.append(s)
        self.answers = [exchange(port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(200) + b"\r\n\r\n"),
                        exchange(port, b"GET /metrics HTTP/1.1\r\n" + b"X-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")]

    def close(self) -> None:
        for s in self.sockets:
            s.close()


def answered_within(port: int, path: str, seconds: float) -> int:
    started = time.monotonic()
    status, _ = http_get(port, path)
    assert time.monotonic() - started < seconds, f"{path} took {time.monotonic() - started:.2f} s"
    return status


def test_the_endpoints_answer_and_anything_else_is_refused_by_name(server):
    assert exchange(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").endswith(b"\r\n\r\nup 1\n")
    assert status_of(exchange(server.port, b"GET /healthz?x=1 HTTP/1.1\r\n\r\n")) == 200
    assert exchange(server.port, b"GET /readyz HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 503 ")
    assert exchange(server.port, b"HEAD /healthz HTTP/1.1\n\n").endswith(b"Connection: close\r\n\r\n")
    assert status_of(exchange(server.port, b"GET /nope HTTP/1.1\r\n\r\n")) == 404
    assert status_of(exchange(server.port, b"POST /healthz HTTP/1.1\r\n\r\n")) == 405
    assert status_of(exchange(server.port, b"\x00\xff garbage\r\n\r\n")) == 400
    assert status_of(exchange(server.port, b"GET /" + b"a" * MAX_REQUEST_LINE + b" HTTP/1.1\r\n\r\n")) == 414
    assert status_of(exchange(server.port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * MAX_HEADER_BYTES + b"\r\n\r\n")) == 431
    many = b"".join(b"X-%d: %s\r\n" % (i, b"a" * 1000) for i in range(40))
    assert status_of(exchange(server.port, b"GET /metrics HTTP/1.1\r\n" + many + b"\r\n")) == 431


def test_a_failing_check_answers_500_and_the_port_goes_on():
    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    s = HttpServer("127.0.0.1", 0, lambda: b"", broken, broken)
    s.start()
    try:
        assert http_get(s.port, "/healthz") == (500, "internal error: RuntimeError: boom\n")
        assert http_get(s.port, "/metrics")[0] == 200
    finally:
        s.stop()


def test_a_port_in_use_stops_start_up(server):
    with pytest.raises(OSError, match="in use"):
        HttpServer("127.0.0.1", server.port, lambda: b"", lambda: (True, ""), lambda: (True, ""))


def test_a_client_that_never_ends_its_request_is_answered_408_after_the_timeout(server, monkeypatch):
    monkeypatch.setattr(http_server, "CONNECTION_TIMEOUT_S", 0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        started = time.monotonic()
        while not select.select([sock], [], [], 0.05)[0]:  # a byte at a time: each read is short, and the
            sock.sendall(b"G")  # deadline is for the whole request
        answer = sock.recv(1000)
        assert status_of(answer) == 408 and b"no whole request within 0.5 s" in answer
        assert time.monotonic() - started < 2


def test_past_the_connection_cap_the_oldest_go_and_probes_are_answered(server):
    open_files(4 * MAX_CONNECTIONS)
    threads = threading.active_count()
    attack = Attack(server.port, 3 * MAX_CONNECTIONS)
    try:
        assert [status_of(a) for a in attack.answers] == [400, 431]
        assert answered_within(server.port, "/healthz", 1) == 200
        assert answered_within(server.port, "/metrics", 1) == 200
        assert server.connections <= MAX_CONNECTIONS
        assert attack.sockets[0].recv(10) == b"", "the oldest connection is closed"
        assert threading.active_count() <= threads + http_server.CHECK_THREADS
    finally:
        attack.close()


def process_status(pid: int) -> dict[str, int]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in lines)
    return {"threads": int(fields["Threads"]), "rss_kib": int(fields["VmRSS"].split()[0]),
            "files": len(list(Path(f"/proc/{pid}/fd").iterdir()))}


def test_hostile_clients_while_events_flow_cost_the_daemon_nothing(daemon_factory, broker, tmp_path, model_dir):
    """1 000 connections that hang half-way through a request, garbage and a megabyte of headers: /healthz
    and /metrics answer within a second throughout, every event is predicted exactly, and the daemon's
    threads, open files and memory come back to where they were (one thread per connection left ~1 000)."""
    open_files(4000)
    d = daemon_factory()
    prepare(d)
    d.start()
    events = make_events(3_000, 100, seed=20)
    feeder = Feeder(broker.bootstrap, d.topic, events, per_second=1000)
    feeder.start()
    d.wait_for(lambda: feeder.sent > 500, 30, "events flowing")
    before = process_status(d.proc.pid)
    attack = Attack(d.port, 1000)
    during = process_status(d.proc.pid)
    for _ in range(5):
        assert answered_within(d.port, "/healthz", 1) == 200
        assert answered_within(d.port, "/metrics", 1) == 200
    attack.close()
    feeder.join()
    assert_exact(tmp_path, model_dir, events, predictions_by_source(d.broker, d.kafka["output_topic"], len(events)))
    after = process_status(d.proc.pid)
    assert during["threads"] <= before["threads"] + http_server.CHECK_THREADS, (before, during)
    assert after["threads"] <= before["threads"] + http_server.CHECK_THREADS, (before, after)
    assert after["files"] <= before["files"] + 5, (before, after)
    assert after["rss_kib"] < before["rss_kib"] + 30 * 1024, (before, after)
    assert d.stop() == 0
