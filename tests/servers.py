"""Private Redis and MongoDB-protocol servers for tests: real processes on free loopback ports.

Reusable by any test (store backends, outage tests, multi-collector tests)::

    server = RedisServer.start(tmp_path / "redis")   # waits until PING answers
    try:
        ...  server.url ...
        server.stop()                                 # by pid; waits until the port is closed
        server.restart()                              # same port, same data dir
    finally:
        server.close()                                # idempotent; always stops the process

Fixtures ``redis_server`` and ``mongo_server`` wrap them (import them into a
conftest with ``from tests.servers import redis_server, mongo_server``).
Readiness is polled with a deadline (PING / ``hello``), never a fixed sleep.

The MongoDB protocol comes from ``secantusd-py`` (PyPI ``secantusdb``, see
``shared/notes/MONGODB.md``): it stores its data under the server's directory
(not ``:memory:``) so that a restart on the same port keeps what was written,
like a real mongod restart.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


class ServerError(RuntimeError):
    """A test server did not start or stop in time (its log tail is in the message)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``cond`` until it is true; :class:`ServerError` naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not cond():
        if time.monotonic() > deadline:
            raise ServerError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - not ours
        return True
    return True


class _Server:
    """A server process owned by a test: started, stopped and restarted on one port."""

    name = "server"

    def __init__(self, directory: Path, port: int) -> None:
        self.dir = directory
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = directory / f"{self.name}.log"
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        """The client URL of the server."""
        raise NotImplementedError

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def log_tail(self, n: int = 2000) -> str:
        """The end of the server's log, for error messages."""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def _launch(self) -> None:
        if self.pid is not None:
            raise ServerError(f"{self.name} on port {self.port} is already running")
        wait_for(lambda: not port_open(self.port), STOP_TIMEOUT_S, f"port {self.port} to be free")
        with open(self.log_path, "ab") as log:
            # Own session: the server never gets the terminal's signals, and stop() reaches it by pid.
            self.proc = subprocess.Popen(
                self._command(),
                cwd=self.dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(
                    f"{self.name} exited with {self.proc.returncode} at start:\n{self.log_tail()}"
                )
            return self._ready()

        try:
            wait_for(ready, START_TIMEOUT_S, f"{self.name} on port {self.port}")
        except BaseException:
            self.stop()
            raise

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the process by its pid (SIGKILL after a timeout) and wait until the port is closed."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT_S)
        wait_for(lambda: not port_open(self.port), STOP_TIMEOUT_S, f"{self.name} port {self.port} to close")

    def kill(self) -> None:
        """Stop the process abruptly (SIGKILL), as a crash would."""
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        """Start the server again on the same port with the same data directory."""
        self.stop()
        self._launch()

    def close(self) -> None:
        """Stop the server if it runs.  Idempotent."""
        self.stop()


class RedisServer(_Server):
    """A private ``redis-server`` (Debian's), no persistence unless ``appendonly``."""

    name = "redis"

    def __init__(self, directory: Path, port: int, *, appendonly: bool = False) -> None:
        super().__init__(directory, port)
        self.appendonly = appendonly

    @classmethod
    def start(cls, directory: Path, port: int | None = None, *, appendonly: bool = False) -> RedisServer:
        """Start one on ``port`` (a free one by default) and wait until it answers PING."""
        server = cls(directory, port or free_port(), appendonly=appendonly)
        server._launch()
        return server

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def _command(self) -> list[str]:
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        # Foreground (no --daemonize) so that Popen's pid is the server's pid.
        return [
            exe,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--dir",
            str(self.dir),
            "--daemonize",
            "no",
        ]

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False


class MongoServer(_Server):
    """A private ``secantusd-py`` MongoDB-protocol server with its data under ``directory``."""

    name = "secantusd"

    @classmethod
    def start(cls, directory: Path, port: int | None = None) -> MongoServer:
        """Start one on ``port`` (a free one by default) and wait until it answers ``hello``."""
        server = cls(directory, port or free_port())
        server._launch()
        return server

    @property
    def url(self) -> str:
        """``mongodb://127.0.0.1:PORT/cloudmon_test`` (direct connection, short timeouts)."""
        return (
            f"mongodb://127.0.0.1:{self.port}/cloudmon_test?directConnection=true"
            "&serverSelectionTimeoutMS=3000&connectTimeoutMS=2000"
        )

    def _command(self) -> list[str]:
        exe = shutil.which("secantusd-py") or str(Path(sys.executable).parent / "secantusd-py")
        config = self.dir / "secantusd.toml"
        if not config.exists():
            config.write_text("")  # an explicit empty config: never pick up ~/.secantus or /etc
        return [
            exe,
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--storage-path",
            str(self.dir / "data"),
            "--log-level",
            "WARNING",
        ]

    def _ready(self) -> bool:
        import pymongo  # only tests that start this server need it
        from pymongo.errors import PyMongoError

        if not port_open(self.port):
            return False
        client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(
            "127.0.0.1", self.port, directConnection=True, serverSelectionTimeoutMS=500
        )
        try:
            client.admin.command("hello")
        except PyMongoError:
            return False
        finally:
            client.close()
        return True


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server for one test, stopped by pid afterwards even if the test fails."""
    server = RedisServer.start(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MongoServer]:
    """A private secantusd-py server for one test, stopped by pid afterwards even if the test fails."""
    server = MongoServer.start(tmp_path_factory.mktemp("mongo"))
    try:
        yield server
    finally:
        server.close()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid still exists (for leak checks)."""
    return _pid_alive(pid)


@pytest.fixture(scope="session")
def redis_session_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for a whole test session (tests isolate themselves by key prefix)."""
    server = RedisServer.start(tmp_path_factory.mktemp("redis-session"))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def mongo_session_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MongoServer]:
    """One secantusd-py for a whole test session (tests isolate themselves by database name)."""
    server = MongoServer.start(tmp_path_factory.mktemp("mongo-session"))
    try:
        yield server
    finally:
        server.close()


def fresh_store_url(request: pytest.FixtureRequest, backend: str) -> str:
    """A store URL of ``backend`` ("redis" / "mongodb") that no other test uses, on a session server.

    Starts the session server on first use, so runs that never ask for a backend never start it.
    """
    tag = uuid.uuid4().hex[:12]
    if backend == "redis":
        redis_srv: RedisServer = request.getfixturevalue("redis_session_server")
        return f"{redis_srv.url}?prefix=t{tag}:"
    if backend == "mongodb":
        mongo_srv: MongoServer = request.getfixturevalue("mongo_session_server")
        return mongo_srv.url.replace("/cloudmon_test?", f"/t{tag}?")
    raise ValueError(f"backend: no test server for {backend!r} (use 'redis' or 'mongodb')")


class HaproxyServer(_Server):
    """A private ``haproxy`` (Debian's) in the foreground (``-db``), with an admin runtime socket.

    ``backends`` maps each backend name to its servers as ``{server: (port, weight)}`` on
    127.0.0.1; the frontend on :attr:`port` routes to the first backend.  The admin socket is
    a Unix socket (:attr:`socket_path`) and a TCP one (:attr:`stats_address`), both
    ``level admin``.  Readiness: the frontend port accepts and the socket answers ``show info``.
    """

    name = "haproxy"

    def __init__(
        self,
        directory: Path,
        port: int,
        backends: dict[str, dict[str, tuple[int, int]]],
        *,
        balance: str = "roundrobin",
    ) -> None:
        import tempfile  # kept local: this helper is appended to a shared module

        super().__init__(directory, port)
        self.backends = backends
        self.balance = balance
        self.stats_port = free_port()
        # A Unix socket path must fit in sun_path (108 bytes); pytest's tmp paths may not.
        short = len(str(directory)) >= 80
        sock_dir = Path(tempfile.mkdtemp(prefix="cm-hap-")) if short else directory
        self._own_sock_dir = sock_dir if short else None
        self.socket_path = sock_dir / "admin.sock"
        self.config_path = directory / "haproxy.cfg"

    @classmethod
    def start(
        cls,
        directory: Path,
        backends: dict[str, dict[str, tuple[int, int]]],
        *,
        balance: str = "roundrobin",
        port: int | None = None,
    ) -> HaproxyServer:
        """Write the config, start haproxy on ``port`` (a free one by default) and wait until ready."""
        server = cls(directory, port or free_port(), backends, balance=balance)
        server._launch()
        return server

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (the frontend)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def stats_address(self) -> str:
        """``127.0.0.1:PORT`` of the TCP admin socket."""
        return f"127.0.0.1:{self.stats_port}"

    def _config(self) -> str:
        lines = [
            "global",
            f"    stats socket {self.socket_path} mode 600 level admin",
            f"    stats socket 127.0.0.1:{self.stats_port} level admin",
            "    stats timeout 30s",
            "defaults",
            "    mode http",
            "    timeout connect 2s",
            "    timeout client 30s",
            "    timeout server 30s",
            "frontend fe",
            f"    bind 127.0.0.1:{self.port}",
            f"    default_backend {next(iter(self.backends))}",
        ]
        for backend, servers in self.backends.items():
            lines += [f"backend {backend}", f"    balance {self.balance}"]
            lines += [f"    server {name} 127.0.0.1:{p} weight {w}" for name, (p, w) in servers.items()]
        return "\n".join(lines) + "\n"

    def _command(self) -> list[str]:
        self.config_path.write_text(self._config())
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()  # a stale socket file from a previous run
        exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
        # -db: foreground, no daemon, so Popen's pid is haproxy's pid.
        return [exe, "-db", "-f", str(self.config_path)]

    def close(self) -> None:
        """Stop haproxy (by pid) and remove its short socket directory if it made one.  Idempotent."""
        super().close()
        if self._own_sock_dir is not None:
            shutil.rmtree(self._own_sock_dir, ignore_errors=True)

    def _ready(self) -> bool:
        if not port_open(self.port):
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                s.connect(str(self.socket_path))
                s.sendall(b"show info\n")
                return s.recv(64).startswith(b"Name: HAProxy")
        except OSError:
            return False
