"""What request handlers need, filled in by the service once its dependencies are up."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

import asyncpg
from aiohttp import web
from aiokafka import AIOKafkaProducer

from consumer.api.errors import ApiError
from consumer.api.fleet_rankings import FleetRankings
from consumer.settings import Settings

if TYPE_CHECKING:
    from consumer.api.stream import ChangeFeed

# For every connection of the API's pool. Its queries are short and index-driven: compiling
# one with JIT (which the fleet report's cost estimate triggers) takes longer than running it.
API_SERVER_SETTINGS = {"jit": "off"}


@dataclass
class ApiDeps:
    settings: Settings
    pool: asyncpg.Pool | None = None  # reads (and assignment writes); may point at a replica
    producer: AIOKafkaProducer | None = None  # HTTP ingestion
    # How current the API's database is: now on a primary, replay's position on a replica
    # (consumer.api.replica keeps it); None until first known.
    data_as_of: datetime | None = None
    _reports: asyncio.Semaphore | None = field(default=None, repr=False)
    _rankings: FleetRankings | None = field(default=None, repr=False)
    # The live stream's feed (consumer.api.stream), from its first subscriber on.
    change_feed: ChangeFeed | None = field(default=None, repr=False)

    def require_pool(self) -> asyncpg.Pool:
        if self.pool is None:
            raise ApiError(503, "not_ready", "the database is not connected yet")
        return self.pool

    def require_producer(self) -> AIOKafkaProducer:
        if self.producer is None:
            raise ApiError(503, "broker_unavailable", "the broker is not connected yet")
        return self.producer

    async def close(self) -> None:
        """Stop what the handlers started (the stream's feed); the pool is its owner's."""
        if self.change_feed is not None:
            await self.change_feed.close()

    def fleet_rankings(self) -> FleetRankings:
        if self._rankings is None:
            self._rankings = FleetRankings(self.settings.api_report_cache_windows)
        return self._rankings

    @contextlib.asynccontextmanager
    async def report_slot(self) -> AsyncIterator[None]:
        """One of FLEET_API_MAX_CONCURRENT_REPORTS; none free is a fast 503, never a queue
        of expensive queries holding the pool."""
        if self._reports is None:
            self._reports = asyncio.Semaphore(self.settings.api_max_concurrent_reports)
        if self._reports.locked():
            raise ApiError(
                503,
                "overloaded",
                "too many reports are running; retry shortly",
                {"Retry-After": "1"},
            )
        async with self._reports:
            yield


DEPS = web.AppKey("deps", ApiDeps)
