"""Charging sessions, charger health and alerts, as the sessions worker keeps them.

Reads page an index each (newest sessions first, worst chargers first, newest alerts
first) with an opaque cursor of the last row's sort key; nothing here scans history.
Acknowledging an alert is a write (admin scope): the alert and its transition (the
outbox row the publisher sends) commit together.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg
from aiohttp import web
from pydantic import TypeAdapter

from consumer.api.contract import (
    Alert,
    AlertPage,
    AlertPath,
    AlertsQuery,
    ApiModel,
    ChargerHealth,
    ChargerPage,
    ChargersQuery,
    CursorRatio,
    MeterPath,
    Session,
    SessionPage,
    SessionPath,
    SessionsQuery,
    VehiclePath,
    decode_cursor,
    encode_cursor,
)
from consumer.api.deps import DEPS
from consumer.api.errors import ApiError, writes_refused_as_read_only
from consumer.api.operation import Answer, Operation
from consumer.models import DeviceId, Timestamp

# The sort keys the cursors carry: (started or opened at, id) and (average, meter id).
_AT_AND_ID: TypeAdapter[tuple[datetime, UUID]] = TypeAdapter(tuple[Timestamp, UUID])
_WORST_FIRST: TypeAdapter[tuple[Decimal | None, str]] = TypeAdapter(
    tuple[CursorRatio | None, DeviceId]
)

SESSION_COLUMNS = """
session_id::text, vehicle_id, meter_id, started_at, ended_at, state, kwh_delivered_dc,
kwh_consumed_ac, efficiency_ratio, status, soc_start, soc_end, max_battery_temp, readings
"""
# $1 the device, $2 from, $3 to, $4/$5 the cursor (started_at, session id), $6 page size + 1.
_SESSIONS_OF = """
SELECT {columns} FROM charging_sessions
 WHERE {device} = $1
   AND ($2::timestamptz IS NULL OR started_at >= $2) AND ($3::timestamptz IS NULL OR started_at < $3)
   AND ($4::timestamptz IS NULL OR (started_at, session_id) < ($4, $5::uuid))
 ORDER BY started_at DESC, session_id DESC
 LIMIT $6
"""
_SESSION = f"SELECT {SESSION_COLUMNS} FROM charging_sessions WHERE session_id = $1"
# Worst first: the lowest average, chargers without one last, then by meter id.
_CHARGERS = """
SELECT h.meter_id, h.average AS average_efficiency, h.sessions, h.status, h.last_session_at,
       coalesce((SELECT array_agg(a.kind ORDER BY a.kind) FROM alerts a
                  WHERE a.subject = h.meter_id AND a.state <> 'resolved'
                    AND a.kind IN ('charger_efficiency_low', 'meter_overreporting')), '{}') AS open_alerts
  FROM charger_health h
 WHERE ($1::text IS NULL OR h.status = $1)
   AND ($3::text IS NULL
        OR CASE WHEN $2::numeric IS NULL THEN h.average IS NULL AND h.meter_id > $3
                ELSE h.average IS NULL OR h.average > $2
                     OR (h.average = $2 AND h.meter_id > $3) END)
 ORDER BY h.average ASC NULLS LAST, h.meter_id
 LIMIT $4
"""
ALERT_COLUMNS = """
alert_id::text, kind, subject, state, opened_at, acknowledged_at, resolved_at, evidence
"""
_ALERTS = f"""
SELECT {ALERT_COLUMNS} FROM alerts
 WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR kind = $2)
   AND ($3::text IS NULL OR subject = $3)
   AND ($4::timestamptz IS NULL OR (opened_at, alert_id) < ($4, $5::uuid))
 ORDER BY opened_at DESC, alert_id DESC
 LIMIT $6
"""
_ACKNOWLEDGE = f"""
UPDATE alerts SET state = 'acknowledged', acknowledged_at = now(), updated_at = now()
 WHERE alert_id = $1 AND state = 'open'
RETURNING {ALERT_COLUMNS}
"""
_ALERT = f"SELECT {ALERT_COLUMNS} FROM alerts WHERE alert_id = $1"
_ACK_TRANSITION = """
INSERT INTO alert_transitions (alert_id, state, at, evidence)
VALUES ($1::uuid, 'acknowledged', now(), '{"by": "api"}')
"""


def _ok(model: ApiModel) -> web.Response:
    return web.json_response(model.body())


def _page_size(request: web.Request, limit: int | None) -> int:
    return limit or request.app[DEPS].settings.fleet_report_page_size


def _after(cursor: str | None) -> tuple[datetime | None, UUID | None]:
    """Where a newest-first page resumes: the last row's (time, id), or the start."""
    return (None, None) if cursor is None else decode_cursor(cursor, _AT_AND_ID)


def session_from(row: asyncpg.Record) -> Session:
    return Session.model_validate(dict(row))


def sessions_of(device: str) -> Any:
    """The handler of GET /v1/{vehicles|meters}/{id}/sessions."""
    statement = _SESSIONS_OF.format(columns=SESSION_COLUMNS, device=f"{device}_id")

    async def handler(
        request: web.Request, path: VehiclePath | MeterPath, query: SessionsQuery
    ) -> web.Response:
        size = _page_size(request, query.limit)
        after = _after(query.cursor)
        pool = request.app[DEPS].require_pool()
        rows = await pool.fetch(statement, path.device_id, query.from_, query.to, *after, size + 1)
        page = [session_from(r) for r in rows[:size]]
        more = len(rows) > size
        cursor = encode_cursor(page[-1].body()["startedAt"], page[-1].session_id) if more else None
        return _ok(SessionPage(sessions=page, next_cursor=cursor))

    return handler


async def session(request: web.Request, path: SessionPath) -> web.Response:
    row = await request.app[DEPS].require_pool().fetchrow(_SESSION, path.session_id)
    if row is None:
        raise ApiError(404, "session_not_found", "no session with this id")
    return _ok(session_from(row))


async def chargers(request: web.Request, query: ChargersQuery) -> web.Response:
    size = _page_size(request, query.limit)
    average: Decimal | None = None
    meter_id: str | None = None
    if query.cursor is not None:
        average, meter_id = decode_cursor(query.cursor, _WORST_FIRST)
    status = None if query.status is None else str(query.status)
    rows = (
        await request.app[DEPS].require_pool().fetch(_CHARGERS, status, average, meter_id, size + 1)
    )
    page = [ChargerHealth.model_validate(dict(r)) for r in rows[:size]]
    cursor = None
    if len(rows) > size:
        last = rows[size - 1]
        average_text = (
            None if last["average_efficiency"] is None else str(last["average_efficiency"])
        )
        cursor = encode_cursor(average_text, last["meter_id"])
    return _ok(ChargerPage(chargers=page, next_cursor=cursor))


def alert_from(row: asyncpg.Record) -> Alert:
    return Alert.model_validate(dict(row) | {"evidence": json.loads(row["evidence"])})


async def alerts(request: web.Request, query: AlertsQuery) -> web.Response:
    size = _page_size(request, query.limit)
    after = _after(query.cursor)
    rows = (
        await request.app[DEPS]
        .require_pool()
        .fetch(
            _ALERTS,
            None if query.state is None else str(query.state),
            None if query.kind is None else str(query.kind),
            query.subject,
            *after,
            size + 1,
        )
    )
    page = [alert_from(r) for r in rows[:size]]
    cursor = (
        encode_cursor(page[-1].body()["openedAt"], page[-1].alert_id) if len(rows) > size else None
    )
    return _ok(AlertPage(alerts=page, next_cursor=cursor))


async def acknowledge(request: web.Request, path: AlertPath) -> web.Response:
    """open -> acknowledged, with its transition; acknowledging twice changes nothing."""
    with writes_refused_as_read_only("alerts"):
        async with request.app[DEPS].require_pool().acquire() as conn, conn.transaction():
            row = await conn.fetchrow(_ACKNOWLEDGE, path.alert_id)
            if row is not None:
                await conn.execute(_ACK_TRANSITION, path.alert_id)
                return _ok(alert_from(row))
            row = await conn.fetchrow(_ALERT, path.alert_id)
    if row is None:
        raise ApiError(404, "alert_not_found", "no alert with this id")
    if row["state"] == "resolved":
        raise ApiError(409, "alert_resolved", "the alert is already resolved")
    return _ok(alert_from(row))  # already acknowledged


_DB = Answer(
    "not_ready, database_unavailable, query_timeout: the database did not answer; retry "
    "after Retry-After seconds."
)


def _sessions_operation(device: str, path: type[VehiclePath] | type[MeterPath]) -> Operation:
    return Operation(
        "GET",
        f"/v1/{device}s/{{{device}Id}}/sessions",
        f"{device}Sessions",
        f"The {device}'s charging sessions, newest first, paginated",
        sessions_of(device),
        {200: Answer("One page of sessions.", SessionPage), 503: _DB},
        path_params=path,
        query=SessionsQuery,
    )


OPERATIONS = [
    _sessions_operation("vehicle", VehiclePath),
    _sessions_operation("meter", MeterPath),
    Operation(
        "GET",
        "/v1/sessions/{sessionId}",
        "session",
        "One charging session",
        session,
        {
            200: Answer("The session.", Session),
            404: Answer("session_not_found."),
            503: _DB,
        },
        path_params=SessionPath,
    ),
    Operation(
        "GET",
        "/v1/chargers/health",
        "chargerHealth",
        "Every charger's recent efficiency and open alerts, worst first, paginated",
        chargers,
        {200: Answer("One page of chargers, worst first.", ChargerPage), 503: _DB},
        query=ChargersQuery,
    ),
    Operation(
        "GET",
        "/v1/alerts",
        "alerts",
        "Alerts, newest first, paginated",
        alerts,
        {200: Answer("One page of alerts.", AlertPage), 503: _DB},
        query=AlertsQuery,
    ),
    Operation(
        "POST",
        "/v1/alerts/{alertId}/ack",
        "acknowledgeAlert",
        "Acknowledge an open alert (its transition is published like the others)",
        acknowledge,
        {
            200: Answer("The alert, acknowledged.", Alert),
            403: Answer("read_only: the API's database role may not write; nothing changed."),
            404: Answer("alert_not_found."),
            409: Answer("alert_resolved: a resolved alert cannot be acknowledged."),
            503: _DB,
        },
        path_params=AlertPath,
    ),
]
