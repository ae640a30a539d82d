"""Real services for tests: Mosquitto brokers of our own, PostgreSQL databases, free ports.

With CI=true a missing service fails the test; locally it skips with a reason saying how to get it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def need(available: bool, what: str, how: str) -> None:
    """Fail in CI, skip locally, when a service a test needs is missing."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is required in CI but missing: {how}")
    pytest.skip(f"{what} is not available; {how}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


@dataclass
class Mosquitto:
    """A Mosquitto of our own on a free port, with TCP_NODELAY, that tests may kill and restart."""

    workdir: Path
    port: int = field(default_factory=free_port)
    extra_conf: str = ""
    persistence: bool = False
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def conf_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    def write_conf(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Run as root, Mosquitto drops to user "mosquitto": it must be able to write here.
        os.chmod(self.workdir, 0o777)
        lines = [
            # Tests run as root in private temporary directories (mode 700): a broker that dropped
            # to the mosquitto user could not read its password, ACL or certificate files there.
            "user root" if os.geteuid() == 0 else "",
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true" if "allow_anonymous" not in self.extra_conf else "",
            "set_tcp_nodelay true",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/" if self.persistence else "",
            f"log_dest file {self.workdir}/mosquitto.log",
            "max_queued_messages 100000",
            "max_inflight_messages 0",
            self.extra_conf,
        ]
        self.conf_path.write_text("\n".join(line for line in lines if line) + "\n")

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        need(os.path.exists(binary), "mosquitto", "install it with `apt-get install mosquitto`")
        self.write_conf()
        self.process = subprocess.Popen([binary, "-c", str(self.conf_path)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(self.port)
        except TimeoutError:
            self.stop()
            log = (self.workdir / "mosquitto.log")
            raise RuntimeError(f"mosquitto did not start: {log.read_text() if log.exists() else ''}") from None

    def kill(self) -> None:
        """SIGKILL: the broker loses whatever it had not saved."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def log_text(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text() if path.exists() else ""


def stop_process(process: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited after `grace` seconds."""
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def running_mosquitto(workdir: Path, **kwargs: object) -> Iterator[Mosquitto]:
    broker = Mosquitto(workdir, **kwargs)  # type: ignore[arg-type]
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


POSTGRES_ADMIN_DSN = os.environ.get("PROPELLER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def postgres_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class PostgresDatabase:
    name: str
    dsn: str


async def create_database() -> PostgresDatabase:
    import asyncpg

    need(postgres_available(), "PostgreSQL on 127.0.0.1:5432",
         "start it (`pg_ctlcluster 15 main start`) or set PROPELLER_TEST_POSTGRES to an admin DSN")
    name = f"propeller_t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(POSTGRES_ADMIN_DSN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = POSTGRES_ADMIN_DSN.rsplit("/", 1)[0]
    return PostgresDatabase(name, f"{base}/{name}")


async def drop_database(db: PostgresDatabase) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)')
    finally:
        await conn.close()


POSTGRES_BIN = Path(os.environ.get("PROPELLER_TEST_POSTGRES_BIN", "/usr/lib/postgresql/15/bin"))


@dataclass
class PrivatePostgres:
    """A PostgreSQL server of our own (initdb in a temporary directory, a free port, trust auth) that
    tests may stop and start: the shared server on 5432 serves other tests and must stay up.

    PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres` user."""

    port: int = field(default_factory=free_port)
    workdir: Path | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def datadir(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "data"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run([*as_owner, *args], capture_output=True, text=True, timeout=timeout, check=False)

    def init(self) -> None:
        initdb = POSTGRES_BIN / "initdb"
        how = ("install the server (`apt-get install postgresql`) or point PROPELLER_TEST_POSTGRES_BIN at the "
               "directory holding initdb and pg_ctl")
        need(initdb.exists(), f"PostgreSQL's initdb ({initdb})", how)
        if os.geteuid() == 0:
            try:
                import pwd

                owner = pwd.getpwnam("postgres")
            except KeyError:
                owner = None
            need(owner is not None, "the `postgres` user (PostgreSQL does not run as root)", how)
        # Not under pytest's tmp_path: that is private to root, and the server runs as `postgres`.
        self.workdir = Path(tempfile.mkdtemp(prefix="propeller-pg-"))
        if os.geteuid() == 0:
            os.chown(self.workdir, owner.pw_uid, owner.pw_gid)  # type: ignore[union-attr]
        done = self._run(str(initdb), "-D", str(self.datadir), "-U", "postgres", "--auth=trust",
                         "--no-sync", "--encoding=UTF8", "--locale=C")
        need(done.returncode == 0, "a private PostgreSQL cluster", f"initdb failed: {done.stderr.strip()}")
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.workdir}'\nfsync = off\n"
                       "max_connections = 40\nshared_buffers = 16MB\n")

    def start(self) -> None:
        if self.workdir is None:
            self.init()
        done = self._run(str(POSTGRES_BIN / "pg_ctl"), "-D", str(self.datadir), "-l",
                         str(self.workdir / "server.log"), "-w", "-t", "30", "start")
        if done.returncode != 0:
            need(False, f"a private PostgreSQL on port {self.port}",
                 f"pg_ctl start failed: {done.stderr.strip() or done.stdout.strip()}; {self.log_text()[-2000:]}")

    def stop(self, mode: str = "fast") -> None:
        """`fast` rolls back open transactions and closes every connection, as a restart does."""
        if self.workdir is not None and (self.datadir / "postmaster.pid").exists():
            self._run(str(POSTGRES_BIN / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        self.stop("immediate")
        pid_file = self.datadir / "postmaster.pid" if self.workdir is not None else None
        if pid_file is not None and pid_file.exists():  # pg_ctl could not stop it: it must not outlive the test
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def log_text(self) -> str:
        path = self.workdir / "server.log" if self.workdir else None
        return path.read_text(errors="replace") if path and path.exists() else ""


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


class TcpProxy:
    """A TCP proxy on a free loopback port in front of `upstream_port`. Subclasses say in `_serve` what
    each connection does; `close` ends the listener and every connection still open."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for link in list(self._links):
            link.cancel()
        await asyncio.gather(*self._links, return_exceptions=True)

    async def _link(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        link = asyncio.current_task()
        assert link is not None
        self._links.add(link)
        try:
            await self._serve(client_r, client_w)
        except asyncio.CancelledError:
            # Ended by close(). Left cancelled, the task makes the done-callback asyncio 3.11's
            # start_server puts on it raise CancelledError (task.exception()), logged as lost.
            client_w.transport.abort()
        finally:
            self._links.discard(link)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        raise NotImplementedError
