#!/usr/bin/env python3
"""Run a real OpenStack Swift (with its S3 API) on 127.0.0.1 for tests and benchmarks.

Rackspace Cloud Files is Swift, so vhdcore's uploader is tested against the
real thing: Swift from PyPI (``pip install swift python-swiftclient boto3``)
and memcached from the OS (``apt-get install memcached``; tempauth keeps its
tokens there).  Everything -- configs, rings, storage, logs, pid files -- lives
in one directory::

    python scripts/swift_server.py start --dir DIR     # set up (once) and start, wait until ready
    eval "$(python scripts/swift_server.py env --dir DIR)"
    python scripts/swift_server.py status --dir DIR
    python scripts/swift_server.py stop-servers --dir DIR   # Swift down, memcached up (outage tests)
    python scripts/swift_server.py start-servers --dir DIR
    python scripts/swift_server.py stop --dir DIR      # stop every process it started

Five processes, each in its own session: memcached and the proxy, account,
container and object servers, on free ports of 127.0.0.1 chosen at set-up
(``--base-port N`` picks N..N+4 instead).  The proxy pipeline has tempauth
(user ``test:tester``, key ``testing``), SLO and s3api (access key
``test:tester``, secret ``testing``, region ``us-east-1``, path-style).
Where the file system lacks user extended attributes the in-memory object
server is used.

Also usable from Python: ``SwiftServer(directory).start()`` etc.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

SWIFT_SERVERS = ("account", "container", "object", "proxy")
ALL_PROCESSES = ("memcached",) + SWIFT_SERVERS
USER = "test:tester"
KEY = "testing"
REGION = "us-east-1"
_MODULES = {
    "account": "swift.account.server",
    "container": "swift.container.server",
    "object": "swift.obj.server",
    "proxy": "swift.proxy.server",
}

# s3api needs slo to its right, or it turns multipart uploads off ("Multi-part feature isn't
# support"); Swift's own sample orders tempauth, copy, slo, dlo like this.
PROXY_PIPELINE = (
    "catch_errors gatekeeper healthcheck proxy-logging cache listing_formats bulk tempurl "
    "s3api tempauth copy slo dlo proxy-logging proxy-server"
)


class SwiftServerError(RuntimeError):
    """The loopback Swift could not be set up, started or stopped."""


# -- /proc helpers -------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time) of ``pid`` from /proc, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[2]), int(fields[19])


def _alive(pid: int, starttime: int | None = None) -> bool:
    st = _proc_stat(pid)
    if st is None or st[0] in ("Z", "X", "x"):
        return False
    return starttime is None or st[2] == starttime


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st is not None and st[1] == pgid and st[0] not in ("Z", "X", "x"):
                members.append(int(entry))
    return members


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            port = s.getsockname()[1]
            if port not in (8080, 6200, 6201, 6202, 11211):
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def _xattr_supported(directory: Path) -> bool:
    probe = directory / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.vhdcore.probe", b"1")
        return os.getxattr(probe, "user.vhdcore.probe") == b"1"
    except (OSError, AttributeError):
        return False
    finally:
        probe.unlink()


def _http(
    url: str, headers: dict[str, str] | None = None, timeout: float = 3.0, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


class SwiftServer:
    """A loopback Swift whose whole state lives in ``directory``."""

    def __init__(
        self, directory: str | os.PathLike[str], base_port: int | None = None, memory: bool = False
    ) -> None:
        self.dir = Path(directory).absolute()
        self.etc = self.dir / "etc"
        self.srv = self.dir / "srv"
        self.run = self.dir / "run"
        self.log = self.dir / "log"
        self.state_file = self.dir / "state.json"
        self.base_port = base_port
        self.memory = memory
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    # -- state ---------------------------------------------------------------------
    @property
    def state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            raise SwiftServerError(
                f"{self.dir} holds no loopback Swift: run 'start --dir {self.dir}' first"
            ) from None

    @property
    def ports(self) -> dict[str, int]:
        return self.state["ports"]

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['proxy']}"

    def env(self) -> dict[str, str]:
        """The environment variables that point clients at this Swift."""
        return {
            "ST_AUTH": f"{self.proxy_url}/auth/v1.0",
            "ST_USER": USER,
            "ST_KEY": KEY,
            "AWS_ENDPOINT_URL": self.proxy_url,
            "AWS_ACCESS_KEY_ID": USER,
            "AWS_SECRET_ACCESS_KEY": KEY,
            "AWS_DEFAULT_REGION": REGION,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "VHDCORE_TEST_SWIFT_DIR": str(self.dir),
        }

    # -- set-up ----------------------------------------------------------------------
    def setup(self) -> None:
        """Write configs and rings (once; a set-up directory is reused as it is)."""
        if self.state_file.exists():
            return
        try:
            import swift  # noqa: F401
            from swift.common.ring import RingBuilder
        except ImportError:
            raise SwiftServerError(
                "OpenStack Swift is not installed for this Python: pip install swift python-swiftclient boto3"
            ) from None
        memcached = shutil.which("memcached") or (
            "/usr/bin/memcached" if os.path.exists("/usr/bin/memcached") else None
        )
        if memcached is None:
            raise SwiftServerError("memcached is missing: apt-get install memcached")
        for d in (self.etc, self.srv / "d1", self.run, self.log):
            d.mkdir(parents=True, exist_ok=True)
        if self.base_port:
            ports = dict(zip(ALL_PROCESSES, range(self.base_port, self.base_port + 5)))
        else:
            ports = dict(zip(ALL_PROCESSES, _free_ports(5)))
        backend = "object" if not self.memory and _xattr_supported(self.srv / "d1") else "mem_object"
        user = pwd.getpwuid(os.geteuid()).pw_name
        self._write_configs(ports, backend, user)
        for ring, server in (("account", "account"), ("container", "container"), ("object", "object")):
            builder = RingBuilder(6, 1, 1)
            builder.add_dev(
                {
                    "id": 0,
                    "region": 1,
                    "zone": 1,
                    "ip": "127.0.0.1",
                    "port": ports[server],
                    "device": "d1",
                    "weight": 100.0,
                    "meta": "",
                }
            )
            builder.rebalance()
            builder.get_ring().save(str(self.etc / f"{ring}.ring.gz"))
            builder.save(str(self.etc / f"{ring}.builder"))
        state = {"ports": ports, "object_backend": backend, "memcached": memcached, "user": user}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.state_file)

    def _write_configs(self, ports: dict[str, int], backend: str, user: str) -> None:
        common = (
            f"[DEFAULT]\nbind_ip = 127.0.0.1\nworkers = 0\nuser = {user}\nswift_dir = {self.etc}\n"
            f"devices = {self.srv}\nmount_check = false\ndisable_fallocate = true\nlog_level = INFO\n"
        )
        (self.etc / "swift.conf").write_text(
            "[swift-hash]\nswift_hash_path_suffix = vhdcore-loopback\nswift_hash_path_prefix = vhdcore\n\n"
            "[storage-policy:0]\nname = gold\ndefault = yes\n\n[swift-constraints]\n"
        )
        apps = {"account": "account", "container": "container", "object": backend}
        for server in ("account", "container", "object"):
            (self.etc / f"{server}-server.conf").write_text(
                common + f"bind_port = {ports[server]}\nlog_name = {server}-server\n\n"
                f"[pipeline:main]\npipeline = healthcheck {server}-server\n\n"
                f"[app:{server}-server]\nuse = egg:swift#{apps[server]}\n\n"
                "[filter:healthcheck]\nuse = egg:swift#healthcheck\n"
            )
        filters = {
            "catch_errors": "catch_errors",
            "gatekeeper": "gatekeeper",
            "healthcheck": "healthcheck",
            "proxy-logging": "proxy_logging",
            "listing_formats": "listing_formats",
            "bulk": "bulk",
            "tempurl": "tempurl",
            "slo": "slo",
            "dlo": "dlo",
            "copy": "copy",
        }
        text = (
            common + f"bind_port = {ports['proxy']}\nlog_name = proxy-server\n\n"
            f"[pipeline:main]\npipeline = {PROXY_PIPELINE}\n\n"
            "[app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\n"
            "allow_account_management = true\n\n"
            f"[filter:cache]\nuse = egg:swift#memcache\nmemcache_servers = 127.0.0.1:{ports['memcached']}\n\n"
            "[filter:tempauth]\nuse = egg:swift#tempauth\nuser_test_tester = testing .admin\n\n"
            f"[filter:s3api]\nuse = egg:swift#s3api\nlocation = {REGION}\n\n"
        )
        text += "".join(f"[filter:{name}]\nuse = egg:swift#{egg}\n\n" for name, egg in filters.items())
        (self.etc / "proxy-server.conf").write_text(text)

    # -- processes ------------------------------------------------------------------------
    def _pidfile(self, name: str) -> Path:
        return self.run / f"{name}.pid"

    def _read_pid(self, name: str) -> tuple[int, int] | None:
        try:
            record = json.loads(self._pidfile(name).read_text())
            return int(record["pid"]), int(record["starttime"])
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def running(self, name: str) -> int | None:
        """The pid of process ``name`` if it is running (not a zombie), else None."""
        child = self._children.get(name)
        if child is not None:
            child.poll()  # reap our own dead children
        record = self._read_pid(name)
        if record is None:
            return None
        pid, starttime = record
        return pid if _alive(pid, starttime) else None

    def _command(self, name: str) -> list[str]:
        if name == "memcached":
            cmd = [
                self.state["memcached"],
                "-l",
                "127.0.0.1",
                "-p",
                str(self.ports["memcached"]),
                "-U",
                "0",
                "-m",
                "64",
                "-c",
                "1024",
            ]
            if os.geteuid() == 0:
                cmd += ["-u", "root"]
            return cmd
        code = "import sys; sys.argv[0] = 'swift-%s-server'; from %s import main; main()" % (
            name,
            _MODULES[name],
        )
        # -v: log to stdout too, i.e. to log/NAME.log (syslog may not exist here)
        return [sys.executable, "-c", code, str(self.etc / f"{name}-server.conf"), "-v"]

    def _spawn(self, name: str) -> None:
        if self.running(name):
            return
        port = self.ports[name]
        if not _port_free(port):
            raise SwiftServerError(
                f"port {port} for {name} on 127.0.0.1 is taken by another process; "
                f"stop it or remove {self.dir} to set up again on other ports"
            )
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                self._command(name),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        self._children[name] = proc
        st = None
        for _ in range(100):
            st = _proc_stat(proc.pid)
            if st is not None:
                break
            time.sleep(0.01)
        starttime = st[2] if st else 0
        tmp = self._pidfile(name).with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": proc.pid, "starttime": starttime, "command": name}))
        tmp.replace(self._pidfile(name))

    def _kill(self, name: str, timeout: float = 10.0) -> None:
        record = self._read_pid(name)
        if record is None:
            return
        pid, starttime = record
        if _alive(pid, starttime):
            # each process leads its own session and group: signal the group (workers too)
            pgid = pid
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline:
                    child = self._children.get(name)
                    if child is not None:
                        child.poll()
                    if not _group_members(pgid):
                        break
                    time.sleep(0.05)
                else:
                    continue
                break
            if _group_members(pgid):
                raise SwiftServerError(f"{name} (pid {pid}) did not stop")
        child = self._children.pop(name, None)
        if child is not None:
            try:
                child.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        self._pidfile(name).unlink(missing_ok=True)

    def _wait_memcached(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.ports["memcached"]), timeout=1) as s:
                    s.sendall(b"version\r\n")
                    if s.recv(64).startswith(b"VERSION"):
                        return
            except OSError:
                pass
            if not self.running("memcached"):
                raise SwiftServerError(f"memcached exited; see {self.log / 'memcached.log'}")
            time.sleep(0.05)
        raise SwiftServerError("memcached did not answer in time")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait for every /healthcheck, then for an authenticated request to succeed."""
        deadline = time.monotonic() + timeout
        pending = list(SWIFT_SERVERS)
        while pending:
            name = pending[0]
            if not self.running(name):
                raise SwiftServerError(f"{name} server exited; last log lines:\n{self.log_tail(name)}")
            try:
                status, _, _ = _http(f"http://127.0.0.1:{self.ports[name]}/healthcheck", timeout=2)
                if status == 200:
                    pending.pop(0)
                    continue
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SwiftServerError(f"{name} server not healthy after {timeout} s:\n{self.log_tail(name)}")
            time.sleep(0.05)
        last = ""
        while True:
            try:
                status, headers, body = _http(
                    f"{self.proxy_url}/auth/v1.0", {"X-Auth-User": USER, "X-Auth-Key": KEY}, timeout=5
                )
                if status == 200:
                    status, _, body = _http(
                        headers["x-storage-url"], {"X-Auth-Token": headers["x-auth-token"]}, timeout=5
                    )
                    if 200 <= status < 300:
                        return
                last = f"HTTP {status}: {body[:200]!r}"
            except OSError as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                raise SwiftServerError(f"authenticated request failed ({last}):\n{self.log_tail('proxy')}")
            time.sleep(0.1)

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join((self.log / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    # -- public verbs ------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        """Set up if needed, start every process that is not running, wait until ready."""
        self.setup()
        try:
            if not self.running("memcached"):
                self._spawn("memcached")
            self._wait_memcached(timeout)
            self.start_servers(timeout)
        except BaseException:
            self.stop()
            raise

    def start_servers(self, timeout: float = 60.0) -> None:
        """Start the four Swift servers (memcached must be running) and wait until ready."""
        for name in SWIFT_SERVERS:
            self._spawn(name)
        self.wait_ready(timeout)

    def stop_servers(self) -> None:
        """Stop the four Swift servers, leaving memcached (and tokens) alone."""
        for name in reversed(SWIFT_SERVERS):
            self._kill(name)

    def stop(self) -> None:
        """Stop every process this directory's Swift started."""
        errors = []
        for name in reversed(ALL_PROCESSES):
            try:
                self._kill(name)
            except SwiftServerError as exc:
                errors.append(str(exc))
        if errors:
            raise SwiftServerError("; ".join(errors))

    def status(self) -> dict[str, int | None]:
        """``{process name: pid or None}``."""
        return {name: self.running(name) for name in ALL_PROCESSES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "command", choices=["start", "stop", "env", "status", "start-servers", "stop-servers"]
    )
    parser.add_argument(
        "--dir", required=True, help="directory for all state (configs, rings, data, logs, pids)"
    )
    parser.add_argument("--base-port", type=int, default=None, help="use ports N..N+4 instead of free ones")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for readiness")
    parser.add_argument(
        "--memory", action="store_true", help="at set-up: keep objects in memory (in-memory object server)"
    )
    args = parser.parse_args(argv)
    server = SwiftServer(args.dir, base_port=args.base_port, memory=args.memory)
    try:
        if args.command == "start":
            t0 = time.monotonic()
            server.start(args.timeout)
            print(
                f"swift ready at {server.proxy_url} ({time.monotonic() - t0:.1f} s); "
                f"object server: {server.state['object_backend']}",
                file=sys.stderr,
            )
        elif args.command == "stop":
            if server.state_file.exists():
                server.stop()
        elif args.command == "start-servers":
            server.start_servers(args.timeout)
        elif args.command == "stop-servers":
            server.stop_servers()
        elif args.command == "env":
            for key, value in server.env().items():
                print(f"export {key}={shlex.quote(value)}")
        elif args.command == "status":
            status = server.status()
            for name, pid in status.items():
                print(f"{name:10} {'running, pid ' + str(pid) if pid else 'stopped'}")
            return 0 if all(status.values()) else 3
    except SwiftServerError as exc:
        print(f"swift_server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
