"""The sessions worker: charging sessions kept from history, and the alerts they raise.

The batch transaction marks which devices got readings (session_changes, meter_changes,
sql/011); nothing else on the write path knows about sessions. Each cycle, in one
transaction, this worker:

1. reads the watermark: how far the ingest group has read in event time, taken as its
   slowest active partition's newest reading (never ahead of the wall clock, so a device
   whose clock runs fast cannot close sessions early), less FLEET_SESSION_LATENESS_MINUTES;
2. takes a bounded set of marks and recomputes the touched vehicles' sessions from
   history (fleet_sessionize) and the AC side of the touched meters' sessions
   (fleet_recount_sessions); a re-sent reading recomputes to the same rows;
3. closes the open sessions the watermark has passed by more than the gap;
4. evaluates the alerts of what changed (consumer.alerts), writing transitions and their
   outbox rows;
5. clears each mark it took, only where its counter did not move meanwhile (a batch that
   committed after step 2 leaves its mark for the next cycle).

A crash anywhere rolls the cycle back whole: marks, sessions and alerts move together.
One worker cycles at a time (a transaction-scoped advisory lock); others wait their turn.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta
from decimal import Decimal

import asyncpg
import structlog

from consumer import alerts, metrics
from consumer.settings import Settings

log = structlog.get_logger(__name__)

_LOCK = "SELECT pg_try_advisory_xact_lock(hashtext('fleet_sessions'))"
_WATERMARK = "SELECT fleet_watermark($1)"  # sql/011
_VEHICLE_MARKS = """
SELECT vehicle_id, since, seq FROM session_changes ORDER BY since, vehicle_id LIMIT $1
"""
_METER_MARKS = """
SELECT meter_id, since, seq FROM meter_changes ORDER BY since, meter_id LIMIT $1
"""
_SESSIONIZE = "SELECT meter_id FROM fleet_sessionize($1, $2, $3, $4, $5, $6, $7)"
_RECOUNT = "SELECT meter_id FROM fleet_recount_sessions($1, $2, $3, $4, $5)"
_CLOSE = """
UPDATE charging_sessions SET state = 'closed', updated_at = now()
 WHERE state = 'open' AND ended_at < $1::timestamptz - $2::interval
RETURNING meter_id
"""
# In key order, as the batch transaction takes them: no deadlock between the two.
_CLEAR_VEHICLE_MARKS = """
DELETE FROM session_changes c
 USING (SELECT m.vehicle_id FROM session_changes m
          JOIN unnest($1::text[], $2::bigint[]) AS t(id, seq) ON m.vehicle_id = t.id AND m.seq = t.seq
         ORDER BY m.vehicle_id FOR UPDATE OF m) x
 WHERE c.vehicle_id = x.vehicle_id
"""
_CLEAR_METER_MARKS = """
DELETE FROM meter_changes c
 USING (SELECT m.meter_id FROM meter_changes m
          JOIN unnest($1::text[], $2::bigint[]) AS t(id, seq) ON m.meter_id = t.id AND m.seq = t.seq
         ORDER BY m.meter_id FOR UPDATE OF m) x
 WHERE c.meter_id = x.meter_id
"""


class SessionWorker:
    """Runs cycles (see the module docstring) until cancelled; owns no connection."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        s = settings
        self.gap = timedelta(minutes=s.session_gap_minutes)
        self.lateness = timedelta(minutes=s.session_lateness_minutes)
        # Through str: 0.85 stays 0.85 in NUMERIC.
        self.thresholds = (
            Decimal(str(s.efficiency_min_ac_kwh)),
            Decimal(str(s.efficiency_fault_below)),
            Decimal(str(s.efficiency_anomalous_above)),
        )

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
                await conn.execute(
                    _CLEAR_VEHICLE_MARKS,
                    [r["vehicle_id"] for r in vehicles],
                    [r["seq"] for r in vehicles],
                )
            if meters:
                await conn.execute(
                    _CLEAR_METER_MARKS, [r["meter_id"] for r in meters], [r["seq"] for r in meters]
                )
        metrics.SESSIONS_CLOSED.inc(len(closed))
        metrics.SESSIONS_WATERMARK.set(watermark.timestamp())
        metrics.SESSIONS_CYCLE_SECONDS.observe(time.monotonic() - started)
        return len(vehicles) == limit or len(meters) == limit
