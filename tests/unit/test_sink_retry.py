"""Riding out the database being away: hold the partitions, retry, release."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
import pytest
from prometheus_client import REGISTRY

from consumer.settings import Settings
from consumer.sink import SinkRetry

SETTINGS = Settings(retry_initial_seconds=0.001, retry_max_seconds=0.002)


class Events:
    def __init__(self) -> None:
        self.log: list[str] = []

    def hold(self) -> None:
        self.log.append("hold")

    def release(self) -> None:
        self.log.append("release")


def flaky(failures: int, error: Exception) -> Callable[[], Awaitable[str]]:
    """A call that fails `failures` times, then answers 'ok'."""
    left = [failures]

    async def call() -> str:
        if left[0]:
            left[0] -= 1
            raise error
        return "ok"

    return call


async def test_an_outage_holds_the_partitions_once_and_releases_them_when_it_ends() -> None:
    events = Events()
    retry = SinkRetry(SETTINGS, hold=events.hold, release=events.release, stopping=asyncio.Event())
    before = REGISTRY.get_sample_value("fleet_sink_retries_total") or 0
    result = await retry.run(flaky(3, ConnectionRefusedError()), asyncio.sleep)
    assert result == "ok"
    assert events.log == ["hold", "release"]
    assert REGISTRY.get_sample_value("fleet_sink_retries_total") == before + 3
    assert REGISTRY.get_sample_value("fleet_sink_available") == 1


async def test_partitions_stay_held_until_the_last_failing_call_succeeds() -> None:
    """Two lanes failing at once: one recovering does not resume reading for both."""
    events = Events()
    retry = SinkRetry(SETTINGS, hold=events.hold, release=events.release, stopping=asyncio.Event())
    slow = flaky(20, ConnectionResetError())
    fast = flaky(1, ConnectionResetError())
    first = asyncio.create_task(retry.run(slow, asyncio.sleep))
    await asyncio.sleep(0)
    assert await retry.run(fast, asyncio.sleep) == "ok"
    assert events.log.count("release") == 0 and retry.failing
    assert await first == "ok"
    assert events.log == ["hold", "hold", "release"]


async def test_an_error_no_retry_can_fix_is_raised_at_once() -> None:
    events = Events()
    retry = SinkRetry(SETTINGS, hold=events.hold, release=events.release, stopping=asyncio.Event())
    with pytest.raises(asyncpg.UndefinedFunctionError):
        await retry.run(flaky(1, asyncpg.UndefinedFunctionError("gone")), asyncio.sleep)
    assert events.log == []


async def test_asked_to_stop_while_the_database_is_away_it_gives_up_with_none() -> None:
    events, stopping = Events(), asyncio.Event()
    retry = SinkRetry(SETTINGS, hold=events.hold, release=events.release, stopping=stopping)

    async def wait(seconds: float) -> None:
        stopping.set()

    assert await retry.run(flaky(100, OSError()), wait) is None
    assert events.log == ["hold", "release"]
