"""The sessions worker: charging sessions kept from history, and the alerts they raise.

The batch transaction marks which devices got readings (session_marks, meter_marks,
sql/011); nothing else on the write path knows about sessions. Each cycle, in one
transaction, this worker:

1. reads the watermark: how far the ingest group has read in event time, taken as its
   slowest active partition's newest reading (never ahead of the wall clock, so a device
   whose clock runs fast cannot close sessions early), less FLEET_SESSION_LATENESS_MINUTES;
2. takes the oldest marks (a bounded number) and recomputes the touched vehicles' sessions from
   history (fleet_sessionize) and the AC side of the touched meters' sessions
   (fleet_recount_sessions); a re-sent reading recomputes to the same rows;
3. closes the open sessions the watermark has passed by more than the gap;
4. evaluates the alerts of what changed (consumer.alerts), writing transitions and their
   outbox rows;
5. deletes the marks it took (a batch that committed meanwhile left marks of its own,
   taken by the next cycle).

A crash anywhere rolls the cycle back whole: marks, sessions and alerts move together.
One worker cycles at a time (a transaction-scoped advisory lock); others wait their turn.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta

import asyncpg
import structlog

from consumer import alerts, metrics
from consumer.settings import Settings

log = structlog.get_logger(__name__)

_LOCK = "SELECT pg_try_advisory_xact_lock(hashtext('fleet_sessions'))"
_WATERMARK = "SELECT fleet_watermark($1)"  # sql/011
# The oldest marks first; a device marked by several batches is recomputed once, from the
# earliest of its readings among them.
_VEHICLE_MARKS = """
SELECT vehicle_id, min(since) AS since, array_agg(id) AS ids
  FROM (SELECT id, vehicle_id, since FROM session_marks ORDER BY id LIMIT $1) m
 GROUP BY vehicle_id
"""
_METER_MARKS = """
SELECT meter_id, min(since) AS since, array_agg(id) AS ids
  FROM (SELECT id, meter_id, since FROM meter_marks ORDER BY id LIMIT $1) m
 GROUP BY meter_id
"""
_SESSIONIZE = "SELECT meter_id FROM fleet_sessionize($1, $2, $3, $4, $5, $6, $7)"
_RECOUNT = "SELECT meter_id FROM fleet_recount_sessions($1, $2, $3, $4, $5)"
_CLOSE = """
UPDATE charging_sessions SET state = 'closed', updated_at = now()
 WHERE state = 'open' AND ended_at < $1::timestamptz - $2::interval
RETURNING meter_id
"""
_CLEAR_VEHICLE_MARKS = "DELETE FROM session_marks WHERE id = ANY($1::bigint[])"
_CLEAR_METER_MARKS = "DELETE FROM meter_marks WHERE id = ANY($1::bigint[])"


class SessionWorker:
    """Runs cycles (see the module docstring) until cancelled; owns no connection."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        s = settings
        self.gap = timedelta(minutes=s.session_gap_minutes)
        self.lateness = timedelta(minutes=s.session_lateness_minutes)
        self.thresholds = s.efficiency_thresholds

    async def run(self) -> None:
        """A cycle every FLEET_SESSIONS_INTERVAL_SECONDS, at once again while marks are left;
        a failed cycle is logged, counted and retried."""
        while True:
            try:
                left = await self.cycle()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                metrics.SESSIONS_ERRORS.inc()
                log.warning("sessions_cycle_failed", error=repr(exc))
                left = False
            if not left:
                await asyncio.sleep(self.settings.sessions_interval_seconds)

    async def cycle(self) -> bool:
        """One cycle; True when marks were left over for the next."""
        started = time.monotonic()
        limit = self.settings.sessions_max_devices_per_cycle
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(_LOCK):
                return False  # another worker is cycling
            newest = await conn.fetchval(_WATERMARK, self.settings.group_id)
            if newest is None:
                return False  # no reading yet
            watermark: datetime = newest - self.lateness
            vehicles = await conn.fetch(_VEHICLE_MARKS, limit)
            meters = await conn.fetch(_METER_MARKS, limit)
            touched: set[str] = set()
            if vehicles:
                ids, since = [r["vehicle_id"] for r in vehicles], [r["since"] for r in vehicles]
                rows = await conn.fetch(
                    _SESSIONIZE, ids, since, self.gap, watermark, *self.thresholds
                )
                touched.update(r["meter_id"] for r in rows)
            if meters:
                ids, since = [r["meter_id"] for r in meters], [r["since"] for r in meters]
                rows = await conn.fetch(_RECOUNT, ids, since, *self.thresholds)
                touched.update(r["meter_id"] for r in rows)
            closed = await conn.fetch(_CLOSE, watermark, self.gap)
            touched.update(r["meter_id"] for r in closed if r["meter_id"] is not None)
            await alerts.evaluate(
                conn,
                self.settings,
                meters=sorted(touched),
                vehicles=[(r["vehicle_id"], r["since"]) for r in vehicles],
            )
            if vehicles:
                await conn.execute(_CLEAR_VEHICLE_MARKS, [i for r in vehicles for i in r["ids"]])
            if meters:
                await conn.execute(_CLEAR_METER_MARKS, [i for r in meters for i in r["ids"]])
        metrics.SESSIONS_CLOSED.inc(len(closed))
        metrics.SESSIONS_WATERMARK.set(watermark.timestamp())
        metrics.SESSIONS_CYCLE_SECONDS.observe(time.monotonic() - started)
        taken = sum(len(r["ids"]) for r in vehicles), sum(len(r["ids"]) for r in meters)
        return limit in taken
