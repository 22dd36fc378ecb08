"""A small HTTP proxy on 127.0.0.1 that injects faults between a client and
the loopback Swift: connection resets, 5xx answers, slow answers and hangs.

Each request is matched against the rules in order; the first rule whose
``method``/``path`` match and that still has ``times`` left applies.  The
proxy rewrites ``X-Storage-Url`` so that the client keeps talking through it.
"""
from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Rule:
    kind: str  # "reset", "status", "slow", "hang"
    method: str | None = None
    path_contains: str | None = None
    times: int = 1  # how many requests it applies to (-1: all)
    every: int = 1  # apply to every Nth matching request
    status: int = 503
    delay: float = 0.0
    seen: int = 0
    fired: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.times == 0:
            return False
        if self.method and self.method != method:
            return False
        if self.path_contains and self.path_contains not in path:
            return False
        self.seen += 1
        if self.seen % self.every:
            return False
        if self.times > 0:
            self.times -= 1
        self.fired += 1
        return True


@dataclass
class FaultProxy:
    upstream: str  # http://127.0.0.1:PORT
    rules: list[Rule] = field(default_factory=list)
    log: list[tuple[str, str, str]] = field(default_factory=list)

    def start(self) -> "FaultProxy":
        up = urllib.parse.urlparse(self.upstream)
        proxy = self
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with lock:
                    rule = next((r for r in proxy.rules if r.matches(self.command, self.path)),
                                None)
                proxy.log.append((self.command, self.path, rule.kind if rule else "pass"))
                if rule is not None and rule.kind == "reset":
                    # abort the connection: RST instead of an answer
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.close_connection = True
                    self.connection.close()
                    return
                if rule is not None and rule.kind == "hang":
                    time.sleep(rule.delay)
                    self.close_connection = True
                    self.connection.close()
                    return
                if rule is not None and rule.kind == "status":
                    msg = b"injected failure"
                    self.send_response(rule.status)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                if rule is not None and rule.kind == "slow":
                    time.sleep(rule.delay)
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection", "transfer-encoding")}
                headers["Host"] = up.netloc
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() in ("transfer-encoding", "connection", "content-length"):
                        continue
                    if k.lower() == "x-storage-url":
                        v = v.replace(up.netloc, f"127.0.0.1:{proxy.port}")
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = do_COPY = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    @property
    def auth_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/auth/v1.0"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
