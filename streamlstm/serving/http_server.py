"""The one HTTP port: /metrics for Prometheus, /healthz for liveness, /readyz for readiness, and
/keys/{key} for what is held of one key (serving/queries.py).

Its real clients, Prometheus and the kubelet, send a ~100-byte request and are answered in milliseconds.
Anything else that reaches the port (a scanner, a half-open connection, garbage, megabytes of headers)
must not pile up threads or memory in the daemon, nor crowd the probes out. So connections are served by
one asyncio event loop on one thread (a hanging client costs a socket and a few KiB, not a thread), each
under one deadline and byte limits, at most MAX_CONNECTIONS at once; beyond that the oldest is dropped,
not the newest, so a flood of idle connections cannot keep a probe from being answered. The checks run
on a few worker threads, so a slow scrape never stops the loop from accepting.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from http import HTTPStatus
from urllib.parse import unquote

from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

# A whole request must arrive within this, under one deadline rather than per read, so a client that
# trickles a byte at a time is cut too; the answer's writes get as long again. The kubelet's probe timeout
# defaults to 1 s and Prometheus' to 10 s, and neither needs more than milliseconds here.
CONNECTION_TIMEOUT_S = 5.0
# Connections open at once. A pod has a handful of real clients (Prometheus, the kubelet's probes, an
# operator's curl); past this the oldest is closed, which bounds sockets (file descriptors) and buffers.
MAX_CONNECTIONS = 256
# nginx's defaults (large_client_header_buffers 4 8k): a request line of 8 KiB and 32 KiB of headers, far
# above any scrape or probe.
MAX_REQUEST_LINE = 8 * 1024
MAX_HEADER_BYTES = 32 * 1024
# Connections the kernel queues before they are accepted. socketserver's 5 drops SYNs in a burst of
# connections, and a dropped SYN costs a probe a 1 s retransmission.
LISTEN_BACKLOG = 128
CHECK_THREADS = 4

Route = Callable[[], tuple[int, str, bytes]]
KEYS_PREFIX = "/keys/"  # then the key, percent-encoded
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"


class BadRequest(Exception):
    """A request answered with `status` and closed."""

    def __init__(self, status: HTTPStatus, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class HttpServer:
    """Serves the endpoints from a background thread; the checks are callables returning (ok, detail).

    The port is bound here, so a port in use stops start-up with the error rather than later.
    """

    def __init__(
        self, host: str, port: int, metrics: Callable[[], bytes],
        healthy: Callable[[], tuple[bool, str]], ready: Callable[[], tuple[bool, str]],
        keys: Callable[[str], tuple[int, str, bytes]] | None = None,
    ) -> None:
        self._routes: dict[str, Route] = {"/metrics": lambda: (200, CONTENT_TYPE_LATEST, metrics()),
                                          "/healthz": lambda: _check(healthy), "/readyz": lambda: _check(ready)}
        self._keys = keys
        self._socket = socket.create_server((host, port), backlog=LISTEN_BACKLOG)
        self._loop = asyncio.new_event_loop()
        self._checks = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="http-check")
        self._open: dict[asyncio.Task, None] = {}  # open connections, oldest first
        self._thread = threading.Thread(target=self._loop.run_forever, name="http", daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        return self._socket.getsockname()[1]

    @property
    def connections(self) -> int:
        return len(self._open)

    def start(self) -> None:
        self._server = self._loop.run_until_complete(asyncio.start_server(
            self._connection, sock=self._socket, limit=MAX_HEADER_BYTES, backlog=LISTEN_BACKLOG))
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(CONNECTION_TIMEOUT_S)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CONNECTION_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()
        self._socket.close()
        self._checks.shutdown(wait=False, cancel_futures=True)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._open)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._open[task] = None
        if len(self._open) > MAX_CONNECTIONS:  # forgotten at once: it may be a while before it sees the cancel
            oldest = next(iter(self._open))
            del self._open[oldest]
            oldest.cancel()
        try:
            try:
                method, answer = await asyncio.wait_for(self._answer(reader), CONNECTION_TIMEOUT_S)
            except TimeoutError:
                method, answer = "GET", _error(HTTPStatus.REQUEST_TIMEOUT, f"no whole request within "
                                                                           f"{CONNECTION_TIMEOUT_S:g} s")
            writer.write(answer[0] if method == "HEAD" else answer[0] + answer[1])
            await asyncio.wait_for(_linger(reader, writer), CONNECTION_TIMEOUT_S)
        except (asyncio.CancelledError, TimeoutError, ConnectionError):
            pass  # dropped: too old, too slow, or the client went away
        except Exception:
            log.exception("HTTP connection failed")
        finally:
            self._open.pop(task, None)
            writer.transport.abort()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, tuple[bytes, bytes]]:
        """The request's method and the (head, body) that answer it."""
        try:
            method, path = await _read_request(reader)
            if method not in ("GET", "HEAD"):
                raise BadRequest(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not served: only GET and HEAD")
            target = path.split("?", 1)[0]
            route = self._routes.get(target)
            if route is None and self._keys is not None and target.startswith(KEYS_PREFIX) and len(target) > len(KEYS_PREFIX):
                route = partial(self._keys, unquote(target[len(KEYS_PREFIX):]))
            if route is None:
                raise BadRequest(HTTPStatus.NOT_FOUND, "not found: try /metrics, /healthz, /readyz, /keys/{key}")
            return method, _response(*await self._loop.run_in_executor(self._checks, _run, route))
        except BadRequest as bad:
            return "GET", _error(bad.status, str(bad))


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Send the answer, end our side and read what the client still sends until it closes.

    Closing with unread bytes makes the kernel reset the connection, and a reset can discard the answer
    before the client reads it: a client refused mid-request (431) would see a reset, not the reason.
    """
    await writer.drain()
    writer.write_eof()
    while await reader.read(65536):
        pass


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    """The request line's method and target, once the headers (read and dropped) have ended."""
    line = await _read_line(reader, HTTPStatus.REQUEST_URI_TOO_LONG, f"request line over {MAX_REQUEST_LINE} bytes")
    if len(line) > MAX_REQUEST_LINE:
        raise BadRequest(HTTPStatus.REQUEST_URI_TOO_LONG, f"request line over {MAX_REQUEST_LINE} bytes")
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "not an HTTP request line: expected 'GET /path HTTP/1.1'")
    headers = 0
    while (header := await _read_line(reader, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                      f"headers over {MAX_HEADER_BYTES} bytes")).strip():
        headers += len(header)
        if headers > MAX_HEADER_BYTES:
            raise BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"headers over {MAX_HEADER_BYTES} bytes")
    return parts[0], parts[1]


async def _read_line(reader: asyncio.StreamReader, status: HTTPStatus, too_long: str) -> bytes:
    """One line, of at most the reader's limit (MAX_HEADER_BYTES); a client that closes mid-line is gone."""
    try:
        return await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise BadRequest(status, too_long) from None
    except asyncio.IncompleteReadError:
        raise ConnectionResetError("closed before the request ended") from None


def _run(route: Route) -> tuple[int, str, bytes]:
    """The route's answer; a check that fails is a bug to log, and its probe fails with it."""
    try:
        return route()
    except Exception as e:
        log.exception("HTTP check failed")
        return 500, TEXT, f"internal error: {type(e).__name__}: {e}\n".encode()


def _response(status: int, content_type: str, body: bytes) -> tuple[bytes, bytes]:
    head = (f"HTTP/1.0 {status} {HTTPStatus(status).phrase}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode(), body


def _error(status: HTTPStatus, detail: str) -> tuple[bytes, bytes]:
    return _response(status, TEXT, f"{detail}\n".encode())


def _check(check: Callable[[], tuple[bool, str]]) -> tuple[int, str, bytes]:
    ok, detail = check()
    return 200 if ok else 503, TEXT, f"{detail}\n".encode()
