"""A fault-injecting HTTP proxy on loopback, in front of an S3 server (moto's, in the tests).

It forwards every request and fails a set fraction of them the ways object stores do: 503 SlowDown
(throttling), 500 InternalError, a connection dropped before the request reaches the store, and a
connection dropped after the store applied it (the client never hears back). Faults are drawn from a
seeded generator, so a run's sequence of faults is reproducible for a given order of requests.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("slowdown", "internal", "drop-before", "drop-after")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
_ERROR_BODY = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
               "<RequestId>fault-proxy</RequestId></Error>")


class FaultProxy:
    """`with FaultProxy(upstream, failure_rate=0.2) as proxy:` then point AWS_ENDPOINT_URL at `proxy.url`."""

    def __init__(self, upstream: str, failure_rate: float, seed: int = 0, faults: tuple[str, ...] = FAULTS,
                 fail_once: Callable[[str, str], bool] | None = None, get_delay: float = 0.0):
        parts = urlsplit(upstream)
        self.kinds = faults  # which of FAULTS to inject
        # `fail_once(method, path)`: fail each such request on its first try only, whatever failure_rate says, so
        # code that retries gets through and code that does not fails, every time (no luck of the draw).
        self.fail_once = fail_once
        self._seen: set[tuple[str, str]] = set()
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.failure_rate = failure_rate
        self.requests = 0
        self.get_delay = get_delay  # seconds each GET waits before it is forwarded: a slow store
        self.log: list[tuple[str, str, int]] = []  # (method, path, body bytes returned) of each forwarded request
        self.faults: Counter[str] = Counter()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def draw(self, method: str = "", path: str = "") -> str | None:
        """The fault for the next request, or None to forward it untouched."""
        with self._lock:
            self.requests += 1
            if self.fail_once is not None:
                if not self.fail_once(method, path) or (method, path) in self._seen:
                    return None
                self._seen.add((method, path))
            elif self._random.random() >= self.failure_rate:
                return None
            fault = self._random.choice(self.kinds)
            self.faults[fault] += 1
            return fault

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet: pytest shows failures, not traffic
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _drop(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _error(self, status: int, code: str, message: str) -> None:
                body = b"" if self.command == "HEAD" else _ERROR_BODY.format(code=code, message=message).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                if status == 503:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(body)

            def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    return response.status, response.reason, response.getheaders(), data
                finally:
                    upstream.close()

            def _handle(self) -> None:
                body = self._body()
                fault = proxy.draw(self.command, urlsplit(self.path).path)
                if fault == "drop-before":
                    return self._drop()
                if fault == "slowdown":
                    return self._error(503, "SlowDown", "Please reduce your request rate.")
                if fault == "internal":
                    return self._error(500, "InternalError", "We encountered an internal error. Please try again.")
                if proxy.get_delay and self.command == "GET":
                    time.sleep(proxy.get_delay)
                status, reason, headers, data = self._forward(body)
                proxy.log.append((self.command, urlsplit(self.path).path, len(data)))
                if fault == "drop-after":
                    return self._drop()
                self.send_response(status, reason)
                for name, value in headers:
                    if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                length = next((v for k, v in headers if k.lower() == "content-length"), None)
                self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler
