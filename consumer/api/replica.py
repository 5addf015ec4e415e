"""How current the API's database is: replay lag on a streaming standby, as of when.

Every second the API asks its own database. On a primary the data is as of now. On a
standby, replay is caught up when it has applied all the WAL it received; otherwise
the data is as of the last transaction it replayed (or, none replayed yet, of the
standby's start), and the lag is the time since.
The lag is exported (fleet_api_replica_lag_seconds), sent on every /v1 answer as the
`Fleet-Data-As-Of` header, and past FLEET_API_MAX_REPLICA_LAG_SECONDS /readyz says the
API is not ready: a load balancer sends readers to a fresher replica.

A standby whose primary is gone receives nothing and so counts as caught up: it serves
the newest data there is to have.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import asyncpg
import structlog
from aiohttp import web

from consumer import metrics
from consumer.api.deps import DEPS, ApiDeps

log = structlog.get_logger(__name__)
AS_OF_HEADER = "Fleet-Data-As-Of"
_POLL_S = 1.0

_LAG_SQL = """
SELECT now() AS now,
       pg_is_in_recovery() AS standby,
       CASE WHEN NOT pg_is_in_recovery() THEN 0
            WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() THEN 0
            -- nothing replayed since the standby started: as old as its start, at best
            ELSE greatest(0, extract(epoch FROM now() - coalesce(
                pg_last_xact_replay_timestamp(), pg_postmaster_start_time())))
       END::float8 AS lag_seconds
"""


class ReplicaLag:
    """Keeps deps.data_as_of and the lag metric current; a readiness check of its own."""

    def __init__(self, deps: ApiDeps) -> None:
        self.deps = deps
        self.lag_seconds: float | None = None

    async def watch(self) -> None:
        """Poll until cancelled; a database that does not answer leaves the last values."""
        while True:
            pool = self.deps.pool
            if pool is not None:
                try:
                    await self.poll(pool)
                except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    self.lag_seconds = None  # unknown: /readyz's database check says why
            await asyncio.sleep(_POLL_S)

    async def poll(self, pool: asyncpg.Pool) -> None:
        row = await pool.fetchrow(_LAG_SQL)
        self.lag_seconds = float(row["lag_seconds"])
        self.deps.data_as_of = row["now"] - timedelta(seconds=self.lag_seconds)
        metrics.API_REPLICA_LAG_SECONDS.set(self.lag_seconds)

    async def check(self) -> None:
        """Readiness: fail past FLEET_API_MAX_REPLICA_LAG_SECONDS."""
        limit = self.deps.settings.api_max_replica_lag_seconds
        if self.lag_seconds is not None and self.lag_seconds > limit:
            raise ConnectionError(f"replica {self.lag_seconds:.1f} s behind (limit {limit:g} s)")


async def as_of_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: how current the data of a /v1 answer is."""
    as_of: datetime | None = request.app[DEPS].data_as_of if DEPS in request.app else None
    if as_of is not None and request.path.startswith("/v1/"):
        response.headers[AS_OF_HEADER] = as_of.isoformat()
