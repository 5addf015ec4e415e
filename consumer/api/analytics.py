"""Analytics read side: charging efficiency, vehicle->meter assignments, live readings.

Handlers validate input into ApiError(400, code) before any query, run one
parameterised statement (assignment changes: one transaction) and answer in
camelCase with UTC ISO-8601 timestamps. Energy, temperature and ratios come
from SQL NUMERIC already rounded; they become JSON numbers only at the edge.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any

import asyncpg
from aiohttp import web
from pydantic import Field, TypeAdapter, ValidationError

from consumer.api import analytics_sql as sql
from consumer.api.body import read_json
from consumer.api.deps import DEPS, ApiDeps
from consumer.api.errors import ApiError
from consumer.api.security import charge
from consumer.models import DeviceId, Timestamp

STATUSES = ("normal", "fault", "anomalous", "insufficient_data", "unlinked")

# The ingestion models' rules, so an id or instant the API accepts is one a device could send.
_device_id: TypeAdapter[str] = TypeAdapter(DeviceId)
_timestamp: TypeAdapter[datetime] = TypeAdapter(Timestamp)
# An unencoded "+" in a query string arrives as a space: "...10:00:00 01:00".
_SPACED_OFFSET = re.compile(r"(?<=\d) (\d{2}(?::?\d{2})?)$")


def _deps(request: web.Request) -> ApiDeps:
    return request.app[DEPS]


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def _num(value: Decimal | None) -> float | None:
    # NUMERIC rounded to <= 4 places and < 16 digits: the float's shortest repr is the same text.
    return None if value is None else float(value)


def _parse_id(value: object, code: str, what: str) -> str:
    try:
        return _device_id.validate_python(value)
    except ValidationError:
        raise ApiError(
            400,
            code,
            f"{what} must be 1-128 visible characters (letters, digits, punctuation, symbols; "
            "spaces only between them)",
        ) from None


def _parse_instant(value: object, code: str, name: str, *, from_query: bool) -> datetime:
    if from_query and isinstance(value, str):
        value = _SPACED_OFFSET.sub(r"+\1", value)
    try:
        return _timestamp.validate_python(value).astimezone(UTC)
    except ValidationError:
        raise ApiError(
            400,
            code,
            f"{name} must be an ISO-8601 timestamp with an offset, e.g. 2026-01-31T10:00:00Z",
        ) from None


def _window(request: web.Request) -> tuple[datetime, datetime]:
    """[from, to) from the query; a missing `to` is now, a missing `from` the default span before `to`."""
    settings = _deps(request).settings
    q = request.query
    to = (
        _parse_instant(q["to"], "invalid_to", "to", from_query=True)
        if "to" in q
        else datetime.now(UTC)
    )
    start = (
        _parse_instant(q["from"], "invalid_from", "from", from_query=True)
        if "from" in q
        else to - timedelta(hours=settings.analytics_default_window_hours)
    )
    _check_window(request, start, to)
    return start, to


def _check_window(request: web.Request, start: datetime, to: datetime) -> None:
    """A valid window, charged to the client's rate limit by its length (a unit per day)."""
    max_days = _deps(request).settings.analytics_max_window_days
    if start >= to:
        raise ApiError(400, "invalid_window", "from must be before to")
    if to - start > timedelta(days=max_days):
        raise ApiError(400, "window_too_large", f"the window may span at most {max_days} days")
    charge(request, (to - start) / timedelta(days=1))


def _thresholds(request: web.Request) -> tuple[Decimal, Decimal, Decimal]:
    # Through str: 0.85 stays 0.85 in NUMERIC, not the float just below it.
    s = _deps(request).settings
    return (
        Decimal(str(s.efficiency_min_ac_kwh)),
        Decimal(str(s.efficiency_fault_below)),
        Decimal(str(s.efficiency_anomalous_above)),
    )


async def performance(request: web.Request) -> web.Response:
    vehicle_id = _parse_id(request.match_info["vehicleId"], "invalid_vehicle_id", "vehicleId")
    start, to = _window(request)
    meter_id = request.query.get("meterId")
    if meter_id is not None:
        meter_id = _parse_id(meter_id, "invalid_meter_id", "meterId")
    pool = _deps(request).require_pool()
    row = await pool.fetchrow(
        sql.PERFORMANCE, *_thresholds(request), vehicle_id, start, to, meter_id
    )
    if row["vehicle_readings"] == 0:
        raise ApiError(404, "vehicle_not_found", "the vehicle has no readings in this window")
    return web.json_response(
        {
            "vehicleId": vehicle_id,
            "from": _iso(start),
            "to": _iso(to),
            "meterIds": list(row["meter_ids"]),
            "totalKwhDeliveredDc": _num(row["dc"]),
            "totalKwhConsumedAc": _num(row["ac"]),
            "avgBatteryTemp": _num(row["temp"]),
            "efficiencyRatio": _num(row["ratio"]),
            "status": row["status"],
            "vehicleReadings": row["vehicle_readings"],
            "meterReadings": row["meter_readings"],
        }
    )


@dataclass(frozen=True)
class Cursor:
    """Where the previous page ended, and the window it was computed over.

    Carrying the window keeps a default ("last 24 h") report stable while it is paged.
    """

    start: datetime
    to: datetime
    ratio: Decimal | None
    vehicle_id: str

    def encode(self) -> str:
        raw = [_iso(self.start), _iso(self.to), None if self.ratio is None else str(self.ratio)]
        return base64.urlsafe_b64encode(json.dumps([*raw, self.vehicle_id]).encode()).decode()

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            start, to, ratio, vehicle_id = _cursor_fields.validate_json(
                base64.urlsafe_b64decode(text.encode())
            )
        except (ValueError, binascii.Error):  # ValidationError is a ValueError
            raise ApiError(400, "invalid_cursor", "cursor is not one this API returned") from None
        return cls(start.astimezone(UTC), to.astimezone(UTC), ratio, vehicle_id)


_cursor_fields: TypeAdapter[tuple[datetime, datetime, Decimal | None, str]] = TypeAdapter(
    # Bounded like the ratios the query returns: a forged cursor is a 400, never a SQL error.
    tuple[
        Timestamp,
        Timestamp,
        Annotated[Decimal, Field(allow_inf_nan=False, max_digits=24, decimal_places=4)] | None,
        DeviceId,
    ]
)


def _page_size(request: web.Request) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return _deps(request).settings.fleet_report_page_size
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise ApiError(400, "invalid_limit", "limit must be an integer from 1 to 1000")
    return int(raw)


async def fleet_efficiency(request: web.Request) -> web.Response:
    q = request.query
    status = q.get("status")
    if status is not None and status not in STATUSES:
        raise ApiError(400, "invalid_status", f"status must be one of {', '.join(STATUSES)}")
    limit = _page_size(request)
    cursor = Cursor.decode(q["cursor"]) if "cursor" in q else None
    if cursor is None:
        start, to = _window(request)
    else:
        # The cursor pins the window; a from/to sent along must be the same one.
        start, to = cursor.start, cursor.to
        for name, pinned in (("from", start), ("to", to)):
            if (
                name in q
                and _parse_instant(q[name], f"invalid_{name}", name, from_query=True) != pinned
            ):
                raise ApiError(400, "invalid_cursor", "cursor belongs to a different window")
        _check_window(request, start, to)
    deps = _deps(request)
    pool = deps.require_pool()
    async with deps.report_slot():
        rows = await pool.fetch(
            sql.FLEET_EFFICIENCY,
            *_thresholds(request),
            start,
            to,
            status,
            cursor.ratio if cursor else None,
            cursor.vehicle_id if cursor else None,
            limit + 1,  # one more than a page tells whether another page exists
        )
    page = rows[:limit]
    next_cursor = None
    if len(rows) > limit:
        last = page[-1]
        next_cursor = Cursor(start, to, last["ratio"], last["vehicle_id"]).encode()
    return web.json_response(
        {
            "from": _iso(start),
            "to": _iso(to),
            "vehicles": [
                {
                    "vehicleId": r["vehicle_id"],
                    "meterIds": list(r["meter_ids"]),
                    "totalKwhDeliveredDc": _num(r["dc"]),
                    "totalKwhConsumedAc": _num(r["ac"]),
                    "efficiencyRatio": _num(r["ratio"]),
                    "status": r["status"],
                }
                for r in page
            ],
            "nextCursor": next_cursor,
        }
    )


async def _assignment_body(request: web.Request) -> tuple[str, datetime]:
    body: Any = await read_json(request, _deps(request).settings.api_max_body_bytes)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "body must be a JSON object")
    unknown = sorted(set(body) - {"meterId", "from"})
    if unknown:
        raise ApiError(400, "invalid_body", f"unknown fields: {', '.join(unknown)}")
    meter_id = _parse_id(body.get("meterId"), "invalid_meter_id", "meterId")
    start = _parse_instant(body.get("from"), "invalid_from", "from", from_query=False)
    return meter_id, start


async def put_assignment(request: web.Request) -> web.Response:
    """Close the open assignment at `from` and open [from, NULL), in one transaction."""
    vehicle_id = _parse_id(request.match_info["vehicleId"], "invalid_vehicle_id", "vehicleId")
    meter_id, start = await _assignment_body(request)
    body = {"vehicleId": vehicle_id, "meterId": meter_id, "from": _iso(start), "to": None}
    conflict = ApiError(
        409, "assignment_conflict", "the vehicle already has a meter from that time on"
    )
    try:
        async with _deps(request).require_pool().acquire() as conn, conn.transaction():
            await conn.execute(sql.LOCK_VEHICLE_ASSIGNMENTS, vehicle_id)
            current = await conn.fetchrow(sql.OPEN_ASSIGNMENT, vehicle_id)
            if current is not None:
                if current["meter_id"] == meter_id and current["valid_from"] == start:
                    return web.json_response(body, status=200)  # a repeat: nothing to change
                if current["valid_from"] >= start:
                    raise conflict
                await conn.execute(sql.CLOSE_ASSIGNMENT, vehicle_id, current["valid_from"], start)
            try:
                await conn.execute(sql.OPEN_NEW_ASSIGNMENT, vehicle_id, meter_id, start)
            except asyncpg.ExclusionViolationError:  # the trigger: overlaps a closed assignment
                raise conflict from None
    except (asyncpg.InsufficientPrivilegeError, asyncpg.ReadOnlySQLTransactionError):
        # A login without write grants (sql/009's fleet_reader), or a read-only replica.
        raise ApiError(
            403,
            "read_only",
            "the API's database role may not write: meter assignments are read-only here",
        ) from None
    return web.json_response(body, status=201)


async def get_assignments(request: web.Request) -> web.Response:
    vehicle_id = _parse_id(request.match_info["vehicleId"], "invalid_vehicle_id", "vehicleId")
    rows = await _deps(request).require_pool().fetch(sql.ASSIGNMENTS, vehicle_id)
    assignments = [
        {"meterId": r["meter_id"], "from": _iso(r["valid_from"]), "to": _iso(r["valid_to"])}
        for r in rows
    ]
    return web.json_response({"vehicleId": vehicle_id, "assignments": assignments})


async def vehicle_live(request: web.Request) -> web.Response:
    vehicle_id = _parse_id(request.match_info["vehicleId"], "invalid_vehicle_id", "vehicleId")
    row = await _deps(request).require_pool().fetchrow(sql.VEHICLE_LIVE, vehicle_id)
    if row is None:
        raise ApiError(404, "vehicle_not_found", "no reading of this vehicle yet")
    return web.json_response(
        {
            "vehicleId": vehicle_id,
            "soc": _num(row["soc"]),
            "kwhDeliveredDc": _num(row["kwh_delivered_dc"]),
            "batteryTemp": _num(row["battery_temp"]),
            "timestamp": _iso(row["timestamp"]),
            "updatedAt": _iso(row["updated_at"]),
        }
    )


async def meter_live(request: web.Request) -> web.Response:
    meter_id = _parse_id(request.match_info["meterId"], "invalid_meter_id", "meterId")
    row = await _deps(request).require_pool().fetchrow(sql.METER_LIVE, meter_id)
    if row is None:
        raise ApiError(404, "meter_not_found", "no reading of this meter yet")
    return web.json_response(
        {
            "meterId": meter_id,
            "kwhConsumedAc": _num(row["kwh_consumed_ac"]),
            "voltage": _num(row["voltage"]),
            "timestamp": _iso(row["timestamp"]),
            "updatedAt": _iso(row["updated_at"]),
        }
    )


def analytics_routes() -> list[web.RouteDef]:
    return [
        web.get("/v1/analytics/performance/{vehicleId}", performance),
        web.get("/v1/analytics/fleet/efficiency", fleet_efficiency),
        web.put("/v1/vehicles/{vehicleId}/meter", put_assignment),
        web.get("/v1/vehicles/{vehicleId}/meter", get_assignments),
        web.get("/v1/vehicles/{vehicleId}/live", vehicle_live),
        web.get("/v1/meters/{meterId}/live", meter_live),
    ]
