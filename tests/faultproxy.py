"""Fault-injecting proxies on loopback, for tests: the faults are real broken connections, not mocks.

* `S3FaultProxy` sits in front of the moto S3 server and breaks GET-object responses *after* their
  headers: the body is cut short (truncated) or the connection is reset mid-body. botocore retries
  requests, not broken bodies, which is exactly the fault the code under test has to survive.
* `TcpProxy` forwards bytes to a TCP server (PostgreSQL) and can be switched off, like a server that
  went away, and on again.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import urllib.parse
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# A policy gets (method, key, nth request for that key, 1-based) and answers None, "truncate" or "reset".
Policy = Callable[[str, str, int], str | None]


def first_gets_fail(n: int, *, only: Callable[[str], bool] = lambda key: True) -> Policy:
    """The first `n` GETs of each object key (matching `only`) break, alternately truncated and reset."""

    def policy(method: str, key: str, nth: int) -> str | None:
        if method == "GET" and only(key) and nth <= n:
            return "truncate" if nth % 2 else "reset"
        return None

    return policy


class S3FaultProxy:
    def __init__(self, upstream: str, policy: Policy) -> None:
        up = urllib.parse.urlsplit(upstream)
        self.policy = policy
        self.counts: Counter[str] = Counter()
        self.faults: list[tuple[str, str]] = []  # (key, kind), in order
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                parts = urllib.parse.urlsplit(self.path)
                key = parts.path.lstrip("/")
                is_object = self.command == "GET" and "/" in key and not parts.query
                fault = None
                if is_object and resp.status == 200:
                    with proxy._lock:
                        proxy.counts[key] += 1
                        fault = proxy.policy(self.command, key, proxy.counts[key])
                        if fault:
                            proxy.faults.append((key, fault))
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length", "date", "server"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                if fault:
                    self.send_header("Connection", "close")
                self.end_headers()
                if fault is None:
                    self.wfile.write(data)
                    return
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                if fault == "reset":  # RST instead of FIN: the client sees "connection reset by peer"
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "S3FaultProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TcpProxy:
    """127.0.0.1:<free port> -> `host:port`; `down()` drops every connection and refuses new ones until `up()`."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.port = 0
        self.up()

    def up(self) -> None:
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(64)
        self.port = lst.getsockname()[1]
        self._listener = lst
        threading.Thread(target=self._accept, args=(lst,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            lst, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if lst is not None:
            lst.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    close = down

    def _accept(self, lst: socket.socket) -> None:
        while True:
            try:
                client, _ = lst.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not lst:
                    client.close()
                    server.close()
                    return
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
