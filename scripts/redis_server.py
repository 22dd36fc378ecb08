#!/usr/bin/env python3
"""A throw-away Redis for the fleet tests: loopback only, a free port, its
files in one directory, persistence on (append-only file, fsync on every
write) so that a restart loses nothing.

    python3 scripts/redis_server.py start --dir DIR     # prints the URL
    python3 scripts/redis_server.py restart --dir DIR   # SIGKILL, then start again
    python3 scripts/redis_server.py stop --dir DIR
    python3 scripts/redis_server.py env --dir DIR       # VHDCORE_TEST_REDIS_URL=... lines

The tests import this file to restart the server mid-job.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """The server whose files live in ``directory``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory).resolve()
        self.conf = self.dir / "redis.conf"
        self.pidfile = self.dir / "redis.pid"

    @property
    def port(self) -> int:
        for line in self.conf.read_text().splitlines():
            if line.startswith("port "):
                return int(line.split()[1])
        raise RuntimeError(f"{self.conf}: no port")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def write_conf(self, port: int | None = None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text("\n".join([
            f"port {port or _free_port()}", "bind 127.0.0.1", "protected-mode yes",
            f"dir {self.dir}", f"pidfile {self.pidfile}", f"logfile {self.dir / 'redis.log'}",
            "daemonize yes", "save \"\"", "appendonly yes", "appendfsync always",
            "databases 16", ""]))

    def start(self, timeout: float = 20.0) -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
        if not self.conf.exists():
            self.write_conf()
        subprocess.run([binary, str(self.conf)], check=True, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ping():
                return self.url
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start; see {self.dir}/redis.log")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        pid = self.pid()
        if pid is None:
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        self.pidfile.unlink(missing_ok=True)

    def restart(self, down: float = 0.0) -> str:
        """Kill the server (SIGKILL: nothing flushed at exit), wait ``down``
        seconds, start it again on the same port with the same files."""
        self.stop(signal.SIGKILL)
        time.sleep(down)
        return self.start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("start", "stop", "restart", "env"))
    p.add_argument("--dir", required=True)
    ns = p.parse_args(argv)
    srv = RedisServer(ns.dir)
    if ns.action == "start":
        print(srv.start())
    elif ns.action == "stop":
        srv.stop()
    elif ns.action == "restart":
        print(srv.restart())
    else:
        print(f"export VHDCORE_TEST_REDIS_URL={srv.url}")
        print(f"export VHDCORE_TEST_REDIS_DIR={srv.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
