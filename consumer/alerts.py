"""Alerts: the rules that open and resolve them, and the publisher of their transitions.

The rules are pure functions of evidence (sessions, readings, the watermark); evaluate()
runs them inside the sessions worker's transaction, so an alert's transitions commit with
the session and reading changes that caused them. Kinds and their defaults:

- charger_efficiency_low: a meter's last FLEET_ALERT_SESSIONS (3) closed, rated sessions
  average below FLEET_EFFICIENCY_FAULT_BELOW; resolves at or above it plus
  FLEET_ALERT_EFFICIENCY_MARGIN (0.02): no flapping on noise.
- meter_overreporting: the same average above FLEET_EFFICIENCY_ANOMALOUS_ABOVE; resolves at
  or below it minus the margin.
- battery_overheat: FLEET_OVERHEAT_READINGS (2) consecutive readings at or above
  FLEET_OVERHEAT_C (55 degC); resolves at the first reading below FLEET_OVERHEAT_RESOLVE_C (50).
- device_silent: a device whose newest reading is within FLEET_SILENT_ACTIVE_HOURS (24 h)
  of the watermark but more than FLEET_SILENT_AFTER_MINUTES (15) behind it; resolves when
  it reports again. Event time throughout: the watermark is how far the ingest group has
  read (its slowest active partition's newest reading, capped at the wall clock), so
  replaying old data raises the same alerts as living through it. A
  device whose clock runs more than the silence threshold behind the fleet's is reported
  silent: its readings look old, which is what an operator needs to hear about it.

Transitions (open -> acknowledged -> resolved) are rows of alert_transitions, which is
also the outbox: AlertPublisher sends the unpublished ones to FLEET_ALERTS_TOPIC, keyed
by subject, then stamps them; a send repeated after a crash carries the same id.
"""

from __future__ import annotations

import asyncio
import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer

from consumer import metrics
from consumer.settings import Settings

log = structlog.get_logger(__name__)


class Kind(enum.StrEnum):
    CHARGER_EFFICIENCY_LOW = "charger_efficiency_low"
    METER_OVERREPORTING = "meter_overreporting"
    BATTERY_OVERHEAT = "battery_overheat"
    DEVICE_SILENT = "device_silent"


@dataclass(frozen=True)
class Change:
    """One transition a rule asks for: open or resolve (kind, subject) at an event time."""

    kind: Kind
    subject: str
    opens: bool
    at: datetime
    evidence: dict[str, Any]


# --- the rules (pure) --------------------------------------------------------------------


def efficiency_changes(
    meter_id: str,
    average: Decimal,
    sessions: list[str],
    at: datetime,
    *,
    unresolved: set[Kind],
    settings: Settings,
) -> list[Change]:
    """The two charger rules for one meter's last-K average, with hysteresis."""
    margin = Decimal(str(settings.alert_efficiency_margin))
    _, low, high = settings.efficiency_thresholds
    evidence = {"averageEfficiency": float(average), "sessionIds": sessions}
    rules = (
        (Kind.CHARGER_EFFICIENCY_LOW, average < low, average >= low + margin),
        (Kind.METER_OVERREPORTING, average > high, average <= high - margin),
    )
    changes = []
    for kind, opens, resolves in rules:
        if opens and kind not in unresolved:
            changes.append(Change(kind, meter_id, True, at, evidence))
        elif resolves and kind in unresolved:
            changes.append(Change(kind, meter_id, False, at, evidence))
    return changes


def overheat_changes(
    vehicle_id: str,
    readings: Sequence[tuple[datetime, Decimal]],
    unresolved: bool,
    settings: Settings,
) -> list[Change]:
    """Walk (timestamp, battery temperature) in event-time order through the overheat rule."""
    s = settings
    hot_c, cool_c = Decimal(str(s.overheat_c)), Decimal(str(s.overheat_resolve_c))
    changes: list[Change] = []
    run: list[tuple[datetime, Decimal]] = []
    for ts, temp in readings:
        run = [*run, (ts, temp)][-s.overheat_readings :] if temp >= hot_c else []
        if not unresolved and len(run) == s.overheat_readings:
            evidence = {
                "readings": [{"timestamp": t.isoformat(), "batteryTemp": float(c)} for t, c in run]
            }
            changes.append(Change(Kind.BATTERY_OVERHEAT, vehicle_id, True, ts, evidence))
            unresolved = True
        elif unresolved and temp < cool_c:
            evidence = {"readings": [{"timestamp": ts.isoformat(), "batteryTemp": float(temp)}]}
            changes.append(Change(Kind.BATTERY_OVERHEAT, vehicle_id, False, ts, evidence))
            unresolved = False
    return changes


# --- evaluation in the sessions worker's transaction ---------------------------------------

_UNRESOLVED = """
SELECT kind, subject FROM alerts
 WHERE state <> 'resolved' AND kind = ANY($1::text[]) AND subject = ANY($2::text[])
"""
# Each touched meter's recent closed, rated sessions (oldest first) and how far its rules
# were already walked (charger_health.last_session_at).
_RATED_SESSIONS = """
SELECT m.meter_id, h.last_session_at AS walked_to,
       coalesce(array_agg(s.session_id::text ORDER BY s.ended_at)
                FILTER (WHERE s.session_id IS NOT NULL), '{}') AS ids,
       coalesce(array_agg(s.efficiency_ratio ORDER BY s.ended_at)
                FILTER (WHERE s.session_id IS NOT NULL), '{}') AS ratios,
       coalesce(array_agg(s.ended_at ORDER BY s.ended_at)
                FILTER (WHERE s.session_id IS NOT NULL), '{}') AS ends
  FROM unnest($1::text[]) AS m(meter_id)
  LEFT JOIN charger_health h ON h.meter_id = m.meter_id
  LEFT JOIN LATERAL (
        SELECT c.session_id, c.efficiency_ratio, c.ended_at FROM charging_sessions c
         WHERE c.meter_id = m.meter_id AND c.state = 'closed'
           AND c.status IN ('normal', 'fault', 'anomalous')
         ORDER BY c.ended_at DESC LIMIT $2) s ON true
 GROUP BY m.meter_id, h.last_session_at
"""
_KEEP_HEALTH = """
INSERT INTO charger_health AS h (meter_id, average, sessions, status, last_session_at)
SELECT * FROM unnest($1::text[], $2::numeric[], $3::int[], $4::text[], $5::timestamptz[])
ON CONFLICT (meter_id) DO UPDATE
   SET average = EXCLUDED.average, sessions = EXCLUDED.sessions, status = EXCLUDED.status,
       last_session_at = EXCLUDED.last_session_at, updated_at = now()
"""
_WALK_BACK = 64  # sessions a cycle may close at once for one meter (a backfill) and still walk


@dataclass(frozen=True)
class Health:
    """A charger's health after its newest closed, rated session."""

    average: Decimal | None  # of its last N sessions; None while it has fewer
    sessions: int
    status: str
    last_session_at: datetime | None


def charger_walk(  # noqa: PLR0917 -- the columns of one row of _RATED_SESSIONS
    meter_id: str,
    ids: Sequence[str],
    ratios: Sequence[Decimal],
    ends: Sequence[datetime],
    walked_to: datetime | None,
    unresolved: set[Kind],
    settings: Settings,
) -> tuple[list[Change], Health]:
    """Walk a meter's sessions closed since the last walk, in order, through the charger
    rules: each one rated on the average of the N sessions up to it, at its own end. So a
    backfill, which closes many sessions in one cycle, raises what living through it would."""
    k = settings.alert_sessions
    changes: list[Change] = []
    unresolved = set(unresolved)
    for i, end in enumerate(ends):
        if (walked_to is not None and end <= walked_to) or i + 1 < k:
            continue
        window = slice(i + 1 - k, i + 1)
        rolling = round(sum(ratios[window], Decimal(0)) / k, 4)
        for change in efficiency_changes(
            meter_id, rolling, list(ids[window]), end, unresolved=unresolved, settings=settings
        ):
            (unresolved.add if change.opens else unresolved.discard)(change.kind)
            changes.append(change)
    average = round(sum(ratios[-k:], Decimal(0)) / k, 4) if len(ratios) >= k else None
    status = (
        "insufficient_data" if average is None else settings.efficiency_thresholds.status(average)
    )
    last = ends[-1] if ends else None
    return changes, Health(average, min(len(ratios), k), status, last)


# The readings since each mark, with the few before it that a run of hot readings may
# have started with.
_TEMPERATURES = """
SELECT r.vehicle_id, array_agg(r.ts ORDER BY r.ts) AS ts, array_agg(r.temp ORDER BY r.ts) AS temps
  FROM unnest($1::text[], $2::timestamptz[]) AS m(vehicle_id, since)
 CROSS JOIN LATERAL (
       (SELECT h.vehicle_id, h."timestamp" AS ts, h.battery_temp AS temp FROM vehicle_history h
         WHERE h.vehicle_id = m.vehicle_id AND h."timestamp" < m.since
         ORDER BY h."timestamp" DESC LIMIT $3)
       UNION ALL
       (SELECT h.vehicle_id, h."timestamp", h.battery_temp FROM vehicle_history h
         WHERE h.vehicle_id = m.vehicle_id AND h."timestamp" >= m.since)) r
 GROUP BY r.vehicle_id
"""
# Only the devices whose silence alert must change: quiet without one, or back with one.
# The watermark is read in the same statement as the live rows: one snapshot, so a
# partition's first commit cannot show its devices' readings without its progress.
_SILENCE = """
WITH w AS (SELECT fleet_watermark($1) AS at)
SELECT d.id, d.kind, d.ts, a.subject IS NOT NULL AS alerted, w.at AS watermark
  FROM w
 CROSS JOIN (SELECT vehicle_id AS id, 'vehicle' AS kind, "timestamp" AS ts FROM vehicle_live
             UNION ALL
             SELECT meter_id, 'meter', "timestamp" FROM meter_live) d
  LEFT JOIN alerts a ON a.kind = 'device_silent' AND a.state <> 'resolved' AND a.subject = d.id
 WHERE d.ts >= w.at - $2::interval
   AND (d.ts < w.at - $3::interval) <> (a.subject IS NOT NULL)
"""
_OPEN = """
INSERT INTO alerts (kind, subject, state, opened_at, evidence) VALUES ($1, $2, 'open', $3, $4)
ON CONFLICT (kind, subject) WHERE state <> 'resolved' DO NOTHING
RETURNING alert_id
"""
_RESOLVE = """
UPDATE alerts SET state = 'resolved', resolved_at = $3, updated_at = now()
 WHERE kind = $1 AND subject = $2 AND state <> 'resolved'
RETURNING alert_id
"""
_TRANSITION = """
INSERT INTO alert_transitions (alert_id, state, at, evidence) VALUES ($1, $2, $3, $4)
"""
_OPEN_BY_KIND = "SELECT kind, count(*) FROM alerts WHERE state <> 'resolved' GROUP BY kind"


async def evaluate(
    conn: asyncpg.Connection,
    settings: Settings,
    *,
    meters: list[str],
    vehicles: list[tuple[str, datetime, Decimal]],
) -> None:
    """Run every rule over what changed in this cycle and record the transitions.

    vehicles: (id, earliest new reading, hottest new reading) of each marked vehicle."""
    s = settings
    changes: list[Change] = []
    if meters:
        kinds = [Kind.CHARGER_EFFICIENCY_LOW, Kind.METER_OVERREPORTING]
        unresolved = await _unresolved(conn, kinds, meters)
        rows = await conn.fetch(_RATED_SESSIONS, meters, s.alert_sessions + _WALK_BACK)
        kept: list[tuple[str, Health]] = []
        for row in rows:
            found, health = charger_walk(
                row["meter_id"],
                row["ids"],
                row["ratios"],
                row["ends"],
                row["walked_to"],
                unresolved.get(row["meter_id"], set()),
                s,
            )
            changes += found
            kept.append((row["meter_id"], health))
        await conn.execute(
            _KEEP_HEALTH,
            [m for m, _ in kept],
            [h.average for _, h in kept],
            [h.sessions for _, h in kept],
            [h.status for _, h in kept],
            [h.last_session_at for _, h in kept],
        )
    if vehicles:
        hot = await _unresolved(conn, [Kind.BATTERY_OVERHEAT], [v for v, _, _ in vehicles])
        # Only a hot new reading can open an alert and only an open one can resolve: the
        # other vehicles' readings are not read at all.
        hot_c = Decimal(str(s.overheat_c))
        watched = [(v, since) for v, since, hottest in vehicles if hottest >= hot_c or v in hot]
        rows = await conn.fetch(
            _TEMPERATURES,
            [v for v, _ in watched],
            [since for _, since in watched],
            s.overheat_readings - 1,
        )
        for row in rows:
            readings = list(zip(row["ts"], row["temps"], strict=True))
            changes += overheat_changes(row["vehicle_id"], readings, row["vehicle_id"] in hot, s)
    changes += await _silence_changes(conn, s)
    for change in changes:
        await record(conn, change)
    unresolved_by_kind = dict(await conn.fetch(_OPEN_BY_KIND))
    for kind in Kind:  # a kind whose last alert resolved goes back to 0, not stays
        metrics.ALERTS_OPEN.labels(kind).set(unresolved_by_kind.get(kind, 0))


async def _unresolved(
    conn: asyncpg.Connection, kinds: list[Kind], subjects: list[str]
) -> dict[str, set[Kind]]:
    found: dict[str, set[Kind]] = {}
    for row in await conn.fetch(_UNRESOLVED, [str(k) for k in kinds], subjects):
        found.setdefault(row["subject"], set()).add(Kind(row["kind"]))
    return found


async def _silence_changes(conn: asyncpg.Connection, s: Settings) -> list[Change]:
    after = timedelta(minutes=s.silent_after_minutes)
    active = timedelta(hours=s.silent_active_hours)
    changes = []
    for row in await conn.fetch(_SILENCE, s.group_id, active, after):
        ts = row["ts"]
        evidence = {
            "device": row["kind"],
            "lastReadingAt": ts.isoformat(),
            "watermark": row["watermark"].isoformat(),
        }
        at = ts if row["alerted"] else ts + after  # back when it reported; silent once overdue
        changes.append(Change(Kind.DEVICE_SILENT, row["id"], not row["alerted"], at, evidence))
    return changes


async def record(conn: asyncpg.Connection, change: Change) -> None:
    """Open or resolve one alert and keep the transition (the outbox row) beside it."""
    evidence = json.dumps(change.evidence)
    if change.opens:
        alert_id = await conn.fetchval(_OPEN, change.kind, change.subject, change.at, evidence)
    else:
        alert_id = await conn.fetchval(_RESOLVE, change.kind, change.subject, change.at)
    if alert_id is None:
        return  # already in that state
    state = "open" if change.opens else "resolved"
    await conn.execute(_TRANSITION, alert_id, state, change.at, evidence)
    metrics.ALERT_TRANSITIONS.labels(change.kind, state).inc()
    log.info(
        "alert_" + state, kind=str(change.kind), subject=change.subject, at=change.at.isoformat()
    )


# --- the outbox publisher -----------------------------------------------------------------

_UNPUBLISHED = """
SELECT t.seq, t.transition_id, t.alert_id, t.state, t.at, t.evidence, a.kind, a.subject
  FROM alert_transitions t JOIN alerts a USING (alert_id)
 WHERE t.published_at IS NULL
 ORDER BY t.seq
 LIMIT $1
   FOR UPDATE OF t SKIP LOCKED
"""
_PUBLISHED = "UPDATE alert_transitions SET published_at = now() WHERE seq = ANY($1::bigint[])"
_SEND_TIMEOUT_S = 10.0


def message(row: asyncpg.Record) -> dict[str, Any]:
    """A transition as the alerts topic carries it."""
    return {
        "transitionId": str(row["transition_id"]),
        "alertId": str(row["alert_id"]),
        "kind": row["kind"],
        "subject": row["subject"],
        "state": row["state"],
        "at": row["at"].isoformat(),
        "evidence": json.loads(row["evidence"]),
    }


class AlertPublisher:
    """Sends the outbox's unpublished transitions, in order, and stamps them once acked."""

    def __init__(self, pool: asyncpg.Pool, producer: AIOKafkaProducer, settings: Settings) -> None:
        self.pool = pool
        self.producer = producer
        self.settings = settings

    async def run(self) -> None:
        while True:
            try:
                sent = await self.publish_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                metrics.ALERT_PUBLISH_ERRORS.inc()
                log.warning("alert_publish_failed", error=repr(exc))
                sent = 0
            if not sent:
                await asyncio.sleep(self.settings.alerts_publish_interval_seconds)

    async def publish_once(self, limit: int = 500) -> int:
        """Send one batch; a crash before the stamp commits sends it again, same ids."""
        topic = self.settings.alerts_topic
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_UNPUBLISHED, limit)
            if not rows:
                return 0
            async with asyncio.timeout(_SEND_TIMEOUT_S):
                futures = [
                    await self.producer.send(
                        topic,
                        key=row["subject"].encode(),
                        value=json.dumps(message(row), separators=(",", ":")).encode(),
                    )
                    for row in rows
                ]
                for future in futures:
                    await future
            await conn.execute(_PUBLISHED, [row["seq"] for row in rows])
        metrics.ALERTS_PUBLISHED.inc(len(rows))
        return len(rows)
