"""The one HTTP port: /metrics for Prometheus, /healthz for liveness, /readyz for readiness."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client.exposition import CONTENT_TYPE_LATEST


class HttpServer:
    """Serves the endpoints from a background thread; the checks are callables returning (ok, detail)."""

    def __init__(
        self, host: str, port: int, metrics: Callable[[], bytes],
        healthy: Callable[[], tuple[bool, str]], ready: Callable[[], tuple[bool, str]],
    ) -> None:
        routes = {"/healthz": healthy, "/readyz": ready}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, metrics())
                elif path in routes:
                    ok, detail = routes[path]()
                    self._send(200 if ok else 503, "text/plain; charset=utf-8", f"{detail}\n".encode())
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics, /healthz, /readyz\n")

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # scrapes every few seconds: stay quiet
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
