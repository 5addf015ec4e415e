"""`python -m consumer run` as a child process: the one runner of the tests, the chaos
harness, the benchmarks and the demo."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from consumer.settings import Settings
from devtools.stack import free_port, settings_env


class ConsumerProcess:
    """One consumer process, with an HTTP port and a log file of its own.

    `settings` is a Settings (turned into FLEET_ variables) or a ready environment. The
    HTTP port is `http_port`, else a free one (never the settings', which an in-process
    service of the same test may hold). The log is what the process prints (JSON lines
    with FLEET_LOG_JSON=true); events() reads it.
    The peak resident memory is known once the process has been waited for (the kernel's
    own accounting), and sampled while it runs (sample_rss()).
    """

    def __init__(
        self,
        settings: Settings | Mapping[str, str],
        log_path: Path,
        *args: str,
        http_port: int | None = None,
    ) -> None:
        env = dict(settings_env(settings) if isinstance(settings, Settings) else settings)
        self.http_port = http_port or free_port()
        env["FLEET_HTTP_PORT"] = str(self.http_port)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        with log_path.open("ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(  # noqa: S603 -- this interpreter, our module
                [sys.executable, "-m", "consumer", "run", *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.peak_rss_kib = 0
        self.returncode: int | None = None

    @property
    def member(self) -> str:
        """How it names itself in consumer_offsets.owner (hostname-pid): its suffix."""
        return f"-{self.process.pid}"

    def alive(self) -> bool:
        return self.returncode is None and self.process.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(sig)

    def _reap(self) -> int:
        """Wait for the exit, keeping the kernel's count of its peak memory."""
        if self.returncode is None:
            if self.process.returncode is not None:  # reaped by a poll() already
                self.returncode = self.process.returncode
            else:
                _, status, usage = os.wait4(self.process.pid, 0)
                self.returncode = self.process.returncode = os.waitstatus_to_exitcode(status)
                self.peak_rss_kib = max(self.peak_rss_kib, usage.ru_maxrss)  # KiB on Linux
        return self.returncode

    async def wait(self, timeout: float | None = 60) -> int:
        """The exit status, once it has exited by itself."""
        return await asyncio.wait_for(asyncio.to_thread(self._reap), timeout)

    def kill(self) -> int:
        """SIGKILL (kill -9): no chance to finish anything."""
        if self.returncode is None:
            self.signal(signal.SIGKILL)
        return self._reap()

    async def stop(self, timeout: float = 30) -> int:
        """SIGTERM, as an orchestrator stops it; SIGKILL if that takes longer than timeout."""
        self.signal(signal.SIGTERM)
        try:
            return await self.wait(timeout)
        except TimeoutError:
            return self.kill()

    def sample_rss(self) -> int:
        """Resident memory now (KiB); the peak so far is kept in peak_rss_kib."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return 0
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        peak = int(fields.get("VmHWM", "0 kB").split()[0])
        self.peak_rss_kib = max(self.peak_rss_kib, peak)
        return int(fields.get("VmRSS", "0 kB").split()[0])

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, name: str) -> list[dict[str, Any]]:
        """Its JSON log lines whose event is `name`."""
        lines = (line for line in self.output().splitlines() if line.startswith("{"))
        return [event for event in map(json.loads, lines) if event.get("event") == name]
