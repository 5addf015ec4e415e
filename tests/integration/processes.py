"""Consumer processes (devtools.processes) named after the test, a cuttable TCP proxy for
outage tests, and a Prometheus server for the scrape tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import pytest

from consumer.settings import Settings
from devtools.processes import ConsumerProcess
from devtools.stack import free_port, wait_for_port
from tests.conftest import ARTIFACTS


def consumer_process(settings: Settings, name: str, *args: str) -> ConsumerProcess:
    """`python -m consumer run` with the test's settings; its log is an artifact,
    .pytest-artifacts/<group>-<name>.log."""
    return ConsumerProcess(settings, ARTIFACTS / f"{settings.group_id}-{name}.log", *args)


class TcpProxy:
    """Forwards 127.0.0.1:port to PostgreSQL; cut() drops every connection and refuses new ones.

    hold() keeps what clients send from reaching the server (it is buffered, and counted in
    held_bytes) until release(): a statement "in flight" for as long as a test needs.
    """

    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        socket_dir = parse_qs(parts.query).get("host", [""])[0]
        self._unix_path = f"{socket_dir}/.s.PGSQL.{parts.port or 5432}" if socket_dir else None
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.port = free_port()
        netloc = f"{parts.username or 'postgres'}@127.0.0.1:{self.port}"
        self.dsn = urlunsplit(parts._replace(netloc=netloc, query=""))
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.held_bytes = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def hold(self) -> None:
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()
        self.held_bytes = 0

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            if self._unix_path:
                up_r, up_w = await asyncio.open_unix_connection(self._unix_path)
            else:
                up_r, up_w = await asyncio.open_connection(*self._target)
        except OSError:
            client_w.transport.abort()
            return
        self._writers |= {client_w, up_w}
        await asyncio.gather(
            self._pipe(client_r, up_w, to_server=True), self._pipe(up_r, client_w, to_server=False)
        )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, to_server: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if to_server and not self._flowing.is_set():
                    self.held_bytes += len(data)
                    await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()
            self._writers.discard(writer)


@contextlib.contextmanager
def running_prometheus(scrape_configs: list[dict[str, Any]], workdir: Path) -> Iterator[str]:
    """A Prometheus server (Debian's package) scraping every second; its URL."""
    binary = os.environ.get("FLEET_TEST_PROMETHEUS") or shutil.which("prometheus")
    if not binary:
        pytest.fail(
            "needs a Prometheus server: apt-get install prometheus (or FLEET_TEST_PROMETHEUS)"
        )
    config = workdir / "prometheus.yml"
    config.write_text(
        json.dumps({"global": {"scrape_interval": "1s"}, "scrape_configs": scrape_configs})
    )  # JSON is YAML
    port = free_port()
    with (workdir / "prometheus.log").open("wb") as log:
        server = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(port, timeout=30)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            server.wait(timeout=10)
