"""Riding out the database being away: retry, and hold the partitions meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from consumer import metrics
from consumer.backoff import Backoff
from consumer.errors import is_transient
from consumer.settings import Settings

log = structlog.get_logger(__name__)
T = TypeVar("T")


class SinkRetry:
    """Runs a database call until it succeeds, while PostgreSQL is unavailable.

    On the first transient failure of any call (consumer.errors.is_transient) every
    assigned partition is paused through `hold`, so nothing more is read while nothing
    can be written, and fleet_sink_available drops to 0; the member keeps polling, so it
    stays in the group. Each call retries on its own capped, jittered backoff
    (FLEET_RETRY_INITIAL_SECONDS, FLEET_RETRY_MAX_SECONDS), passing the time with the
    `wait` it was given. When the last failing call succeeds, `release` resumes what may
    be read again. Errors that a retry cannot fix are raised at once.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        hold: Callable[[], None],
        release: Callable[[], None],
        stopping: asyncio.Event,
    ) -> None:
        self._settings = settings
        self._hold = hold
        self._release = release
        self._stopping = stopping
        self._failing = 0  # calls currently retrying

    @property
    def failing(self) -> bool:
        return self._failing > 0

    async def run(
        self, attempt: Callable[[], Awaitable[T]], wait: Callable[[float], Awaitable[None]]
    ) -> T | None:
        """attempt() until it succeeds; None when asked to stop while it still cannot."""
        backoff = Backoff(self._settings.retry_initial_seconds, self._settings.retry_max_seconds)
        failing = False
        try:
            while True:
                try:
                    result = await attempt()
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    if not failing:
                        failing = True
                        self._failing += 1
                        self._hold()
                        metrics.SINK_AVAILABLE.set(0)
                    metrics.SINK_RETRIES.inc()
                    log.warning(
                        "database_unavailable",
                        error=f"{type(exc).__name__}: {exc}",
                        retry_in_seconds=round(backoff.ceiling, 2),
                    )
                    await wait(backoff.next_wait())
                    if self._stopping.is_set():
                        return None
                    continue
                metrics.SINK_AVAILABLE.set(1)
                return result
        finally:
            if failing:
                self._failing -= 1
                if not self._failing:
                    self._release()
                    log.info("database_available")
