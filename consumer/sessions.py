"""The sessions worker: charging sessions kept from history, and the alerts they raise.

The batch transaction appends one mark row with its readings' keys (batch_marks, sql/013);
nothing else on the write path knows about sessions. Each cycle, in one transaction, this
worker:

1. reads the watermark: how far the ingest group has read in event time, taken as its
   slowest active partition's newest reading (never ahead of the wall clock, so a device
   whose clock runs fast cannot close sessions early), less FLEET_SESSION_LATENESS_MINUTES;
2. takes the oldest marks (FLEET_SESSIONS_MAX_BATCHES_PER_CYCLE batches), grouped per device,
   and recomputes the touched vehicles' sessions from history (fleet_sessionize) and the AC
   side of the touched meters' sessions (fleet_recount_sessions); a re-sent reading
   recomputes to the same rows;
3. recomputes the same devices' hourly totals from their earliest new reading's hour
   (fleet_refresh_hourly, sql/014), which the fleet report reads;
4. closes the open sessions the watermark has passed by more than the gap;
5. evaluates the alerts of what changed (consumer.alerts), writing transitions and their
   outbox rows;
6. deletes the marks it took (a batch that committed meanwhile left marks of its own,
   taken by the next cycle).

A crash anywhere rolls the cycle back whole: marks, sessions and alerts move together.
One worker cycles at a time (a transaction-scoped advisory lock); others wait their turn.
While the group replays the past (its watermark more than a minute behind the wall clock: a
backfill, or catching up after an outage) and batches keep arriving, the worker rests between
cycles in proportion to the last one: ingestion keeps the cores, and the worker catches up in
bigger, cheaper bites, at full speed once the write path is quiet. On live data it cycles
every FLEET_SESSIONS_INTERVAL_SECONDS, so a closed session shows within seconds.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import asyncpg
import structlog

from consumer import alerts, metrics
from consumer.settings import Settings

log = structlog.get_logger(__name__)

_LOCK = "SELECT pg_try_advisory_xact_lock(hashtext('fleet_sessions'))"
_WATERMARK = "SELECT fleet_watermark($1)"  # sql/011
# The oldest batches' marks, then their devices, each with the earliest of its readings
# among them (and, for vehicles, the hottest): a device in several batches is recomputed once.
_TAKE_MARKS = """
SELECT coalesce(array_agg(id), '{}') FROM (SELECT id FROM batch_marks ORDER BY id LIMIT $1) b
"""
_VEHICLE_MARKS = """
SELECT v.vehicle_id, min(v.ts) AS since, max(v.temp) AS hottest
  FROM batch_marks b, unnest(b.vehicle_ids, b.vehicle_ts, b.vehicle_temps) AS v(vehicle_id, ts, temp)
 WHERE b.id = ANY($1::bigint[])
 GROUP BY v.vehicle_id
"""
_METER_MARKS = """
SELECT m.meter_id, min(m.ts) AS since
  FROM batch_marks b, unnest(b.meter_ids, b.meter_ts) AS m(meter_id, ts)
 WHERE b.id = ANY($1::bigint[])
 GROUP BY m.meter_id
"""
_SESSIONIZE = "SELECT meter_id FROM fleet_sessionize($1, $2, $3, $4, $5, $6, $7)"
_REFRESH_HOURLY = "SELECT fleet_refresh_hourly($1, $2, $3, $4)"  # sql/014
_RECOUNT = "SELECT meter_id FROM fleet_recount_sessions($1, $2, $3, $4, $5)"
_CLOSE = """
UPDATE charging_sessions SET state = 'closed', updated_at = now()
 WHERE state = 'open' AND ended_at < $1::timestamptz - $2::interval
RETURNING meter_id
"""
_CLEAR_MARKS = "DELETE FROM batch_marks WHERE id = ANY($1::bigint[])"
_PENDING = "SELECT count(*) FROM batch_marks"  # one row a batch: a small table


_LIVE = timedelta(minutes=1)  # a watermark this close to the wall clock is live data


class Progress(NamedTuple):
    """What a cycle did: the batches whose marks it took, those still waiting, and whether
    the group is replaying the past."""

    taken: int
    waiting: int
    replaying: bool = False


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
        """A cycle every FLEET_SESSIONS_INTERVAL_SECONDS while it keeps up; a failed cycle is
        logged, counted and retried."""
        s = self.settings
        waiting = 0
        while True:
            started = time.monotonic()
            try:
                progress = await self.cycle()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                metrics.SESSIONS_ERRORS.inc()
                log.warning("sessions_cycle_failed", error=repr(exc))
                progress = Progress(0, 0)
            arrived = progress.taken + progress.waiting - waiting  # batches since the last cycle
            waiting = progress.waiting
            full = progress.taken == s.sessions_max_batches_per_cycle
            if progress.replaying and waiting and arrived > 0:
                # Behind a backfill: at most FLEET_SESSIONS_MAX_BUSY_FRACTION of the time in
                # cycles. Each later cycle takes more readings per device for the same cost.
                busy = time.monotonic() - started
                await asyncio.sleep(busy * (1 / s.sessions_max_busy_fraction - 1))
            elif not waiting or not (full or progress.replaying):
                await asyncio.sleep(s.sessions_interval_seconds)  # caught up, or live

    async def cycle(self) -> Progress:
        """One cycle (see the module docstring)."""
        started = time.monotonic()
        limit = self.settings.sessions_max_batches_per_cycle
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(_LOCK):
                return Progress(0, 0)  # another worker is cycling: its turn
            newest = await conn.fetchval(_WATERMARK, self.settings.group_id)
            if newest is None:
                return Progress(0, 0)  # no reading yet
            watermark: datetime = newest - self.lateness
            taken: list[int] = await conn.fetchval(_TAKE_MARKS, limit)
            vehicles = await conn.fetch(_VEHICLE_MARKS, taken)
            meters = await conn.fetch(_METER_MARKS, taken)
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
            await conn.execute(
                _REFRESH_HOURLY,
                [r["vehicle_id"] for r in vehicles],
                [r["since"] for r in vehicles],
                [r["meter_id"] for r in meters],
                [r["since"] for r in meters],
            )
            closed = await conn.fetch(_CLOSE, watermark, self.gap)
            touched.update(r["meter_id"] for r in closed if r["meter_id"] is not None)
            await alerts.evaluate(
                conn,
                self.settings,
                meters=sorted(touched),
                vehicles=[(r["vehicle_id"], r["since"], r["hottest"]) for r in vehicles],
            )
            await conn.execute(_CLEAR_MARKS, taken)
            pending = await conn.fetchval(_PENDING)
        metrics.SESSIONS_CLOSED.inc(len(closed))
        metrics.SESSIONS_PENDING.set(pending)
        metrics.SESSIONS_WATERMARK.set(watermark.timestamp())
        metrics.SESSIONS_CYCLE_SECONDS.observe(time.monotonic() - started)
        return Progress(len(taken), pending, replaying=newest < datetime.now(UTC) - _LIVE)
