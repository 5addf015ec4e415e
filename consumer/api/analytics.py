"""Analytics read side: charging efficiency, vehicle->meter assignments, live readings.

Each endpoint is an Operation (consumer.api.operation): its path, query and body are
validated with the models of consumer.api.contract before the handler runs, and its
answer is serialised from them. A handler checks what depends on settings (the
window), runs one parameterised statement (assignment changes: one transaction) and
answers in camelCase with UTC ISO-8601 timestamps. Energy, temperature and ratios come
from SQL NUMERIC already rounded; they become JSON numbers only at the edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
from aiohttp import web
from pydantic import TypeAdapter

from consumer.api import analytics_sql as sql
from consumer.api.contract import (
    ApiModel,
    Assignment,
    AssignmentRequest,
    Assignments,
    AssignmentSpan,
    CursorRatio,
    FleetEfficiency,
    FleetQuery,
    FleetVehicle,
    MeterLive,
    MeterPath,
    Performance,
    PerformanceQuery,
    VehicleLive,
    VehiclePath,
    WindowQuery,
    decode_cursor,
    encode_cursor,
)
from consumer.api.deps import DEPS, ApiDeps
from consumer.api.errors import ApiError, writes_refused_as_read_only
from consumer.api.operation import Answer, Operation, routes_of
from consumer.api.security import charge
from consumer.models import DeviceId, Timestamp


def _deps(request: web.Request) -> ApiDeps:
    return request.app[DEPS]


def _ok(model: ApiModel, status: int = 200) -> web.Response:
    return web.json_response(model.body(), status=status)


def _window(request: web.Request, query: WindowQuery) -> tuple[datetime, datetime]:
    """[from, to) from the query; a missing `to` is now, a missing `from` the default span before `to`."""
    settings = _deps(request).settings
    to = datetime.now(UTC) if query.to is None else query.to.astimezone(UTC)
    if query.from_ is None:
        start = to - timedelta(hours=settings.analytics_default_window_hours)
    else:
        start = query.from_.astimezone(UTC)
    _check_window(request, start, to)
    return start, to


def _check_window(
    request: web.Request, start: datetime, to: datetime, *, slack: timedelta = timedelta(0)
) -> None:
    """A valid window, charged to the client's rate limit by its length (a unit per day)."""
    max_days = _deps(request).settings.analytics_max_window_days
    if start >= to:
        raise ApiError(400, "invalid_window", "from must be before to")
    if to - start > timedelta(days=max_days) + slack:
        raise ApiError(400, "window_too_large", f"the window may span at most {max_days} days")
    charge(request, (to - start) / timedelta(days=1))


WINDOW_REFUSALS = (
    "invalid_window (from not before to)",
    "window_too_large (longer than FLEET_ANALYTICS_MAX_WINDOW_DAYS)",
)


async def performance(
    request: web.Request, path: VehiclePath, query: PerformanceQuery
) -> web.Response:
    start, to = _window(request, query)
    pool = _deps(request).require_pool()
    row = await pool.fetchrow(
        sql.PERFORMANCE,
        *_deps(request).settings.efficiency_thresholds,
        path.vehicle_id,
        start,
        to,
        query.meter_id,
    )
    if row["vehicle_readings"] == 0:
        raise ApiError(404, "vehicle_not_found", "the vehicle has no readings in this window")
    return _ok(
        Performance(
            vehicle_id=path.vehicle_id,
            from_=start,
            to=to,
            meter_ids=list(row["meter_ids"]),
            total_kwh_delivered_dc=row["dc"],
            total_kwh_consumed_ac=row["ac"],
            avg_battery_temp=row["temp"],
            efficiency_ratio=row["ratio"],
            status=row["status"],
            vehicle_readings=row["vehicle_readings"],
            meter_readings=row["meter_readings"],
        )
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
        ratio = None if self.ratio is None else str(self.ratio)
        return encode_cursor(self.start.isoformat(), self.to.isoformat(), ratio, self.vehicle_id)

    @classmethod
    def decode(cls, text: str) -> Cursor:
        start, to, ratio, vehicle_id = decode_cursor(text, _cursor_fields)
        return cls(start.astimezone(UTC), to.astimezone(UTC), ratio, vehicle_id)


_cursor_fields: TypeAdapter[tuple[datetime, datetime, Decimal | None, str]] = TypeAdapter(
    tuple[Timestamp, Timestamp, CursorRatio | None, DeviceId]
)


def _whole_hours(start: datetime, to: datetime) -> tuple[datetime, datetime]:
    """The fleet report's window: [from, to) widened to whole UTC hours, the resolution of
    the hourly totals it reads (sql/014)."""
    floor = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    ceiling = to.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return floor, ceiling if ceiling == to else ceiling + _HOUR


_HOUR = timedelta(hours=1)


async def fleet_efficiency(request: web.Request, query: FleetQuery) -> web.Response:
    limit = query.limit or _deps(request).settings.fleet_report_page_size
    cursor = None if query.cursor is None else Cursor.decode(query.cursor)
    if cursor is None:
        start, to = _whole_hours(*_window(request, query))
    else:
        # The cursor pins the window; a from/to sent along must be the same one.
        start, to = cursor.start, cursor.to
        if _whole_hours(query.from_ or start, query.to or to) != (start, to):
            raise ApiError(400, "invalid_cursor", "cursor belongs to a different window")
        _check_window(request, start, to, slack=2 * _HOUR)  # widened by up to an hour each side
    deps = _deps(request)
    pool = deps.require_pool()
    status = None if query.status is None else str(query.status)

    async def fleet(
        status: str | None, after: Cursor | None, rows: int | None
    ) -> list[asyncpg.Record]:
        async with deps.report_slot():
            ranked: list[asyncpg.Record] = await pool.fetch(
                sql.FLEET_EFFICIENCY,
                *deps.settings.efficiency_thresholds,
                start,
                to,
                status,
                after.ratio if after else None,
                after.vehicle_id if after else None,
                rows,
            )
            return ranked

    ranking = await deps.fleet_rankings().get(pool, (start, to), lambda: fleet(None, None, None))
    # One more than a page tells whether another page exists.
    after = None if cursor is None else (cursor.ratio, cursor.vehicle_id)
    rows = ranking.page(status, after, limit + 1)
    if rows is None:  # the cursor's vehicle has moved since: continue after it as SQL compares
        rows = await fleet(status, cursor, limit + 1)
    page = rows[:limit]
    next_cursor = None
    if len(rows) > limit:
        last = page[-1]
        next_cursor = Cursor(start, to, last["ratio"], last["vehicle_id"]).encode()
    vehicles = [
        FleetVehicle(
            vehicle_id=r["vehicle_id"],
            meter_ids=list(dict.fromkeys(r["meter_ids"])),  # each once, in order of first use
            total_kwh_delivered_dc=r["dc"],
            total_kwh_consumed_ac=r["ac"],
            efficiency_ratio=r["ratio"],
            status=r["status"],
        )
        for r in page
    ]
    return _ok(FleetEfficiency(from_=start, to=to, vehicles=vehicles, next_cursor=next_cursor))


async def put_assignment(
    request: web.Request, path: VehiclePath, body: AssignmentRequest
) -> web.Response:
    """Close the open assignment at `from` and open [from, NULL), in one transaction."""
    vehicle_id, meter_id, start = path.vehicle_id, body.meter_id, body.from_.astimezone(UTC)
    answer = Assignment(vehicle_id=vehicle_id, meter_id=meter_id, from_=start)
    conflict = ApiError(
        409, "assignment_conflict", "the vehicle already has a meter from that time on"
    )
    with writes_refused_as_read_only("meter assignments"):
        async with _deps(request).require_pool().acquire() as conn, conn.transaction():
            await conn.execute(sql.LOCK_VEHICLE_ASSIGNMENTS, vehicle_id)
            current = await conn.fetchrow(sql.OPEN_ASSIGNMENT, vehicle_id)
            if current is not None:
                if current["meter_id"] == meter_id and current["valid_from"] == start:
                    return _ok(answer)  # a repeat: nothing to change
                if current["valid_from"] >= start:
                    raise conflict
                await conn.execute(sql.CLOSE_ASSIGNMENT, vehicle_id, current["valid_from"], start)
            try:
                await conn.execute(sql.OPEN_NEW_ASSIGNMENT, vehicle_id, meter_id, start)
            except asyncpg.ExclusionViolationError:  # the trigger: overlaps a closed assignment
                raise conflict from None
    return _ok(answer, status=201)


async def get_assignments(request: web.Request, path: VehiclePath) -> web.Response:
    rows = await _deps(request).require_pool().fetch(sql.ASSIGNMENTS, path.vehicle_id)
    spans = [
        AssignmentSpan(meter_id=r["meter_id"], from_=r["valid_from"], to=r["valid_to"])
        for r in rows
    ]
    return _ok(Assignments(vehicle_id=path.vehicle_id, assignments=spans))


@dataclass(frozen=True)
class Live:
    """What differs between the vehicle and the meter live endpoints."""

    device: str  # "vehicle" or "meter"
    statement: str
    answer: type[VehicleLive] | type[MeterLive]

    @property
    def not_found(self) -> str:
        return f"{self.device}_not_found"

    async def __call__(self, request: web.Request, path: VehiclePath | MeterPath) -> web.Response:
        row = await _deps(request).require_pool().fetchrow(self.statement, path.device_id)
        if row is None:
            raise ApiError(404, self.not_found, f"no reading of this {self.device} yet")
        return _ok(self.answer.model_validate(dict(row)))


def live_operation(live: Live, path: type[VehiclePath] | type[MeterPath]) -> Operation:
    return Operation(
        "GET",
        f"/v1/{live.device}s/{{{live.device}Id}}/live",
        f"{live.device}Live",
        f"The {live.device}'s newest reading",
        live,
        {
            200: Answer("The newest reading and when it was stored.", live.answer),
            404: Answer(f"{live.not_found}."),
            503: _DB_UNAVAILABLE,
        },
        path_params=path,
    )


_DB_UNAVAILABLE = Answer(
    "not_ready: the database is not connected yet; database_unavailable: it stopped "
    "answering (restart, outage); query_timeout: the query ran past "
    "FLEET_API_STATEMENT_TIMEOUT_MS; retry after Retry-After seconds."
)

OPERATIONS = [
    Operation(
        "GET",
        "/v1/analytics/performance/{vehicleId}",
        "vehiclePerformance",
        "A vehicle's charging efficiency over a window (default: the last 24 h)",
        performance,
        {
            200: Answer("The vehicle's energy, efficiency and status.", Performance),
            404: Answer("vehicle_not_found: no readings of the vehicle in the window."),
            503: _DB_UNAVAILABLE,
        },
        path_params=VehiclePath,
        query=PerformanceQuery,
        refusals=WINDOW_REFUSALS,
    ),
    Operation(
        "GET",
        "/v1/analytics/fleet/efficiency",
        "fleetEfficiency",
        "Every vehicle's efficiency over a window, worst first, paginated",
        fleet_efficiency,
        {
            200: Answer("One page of vehicles, worst first.", FleetEfficiency),
            503: Answer(
                _DB_UNAVAILABLE.description.rstrip(".")
                + "; overloaded: FLEET_API_MAX_CONCURRENT_REPORTS "
                "reports are running (Retry-After: 1)."
            ),
        },
        query=FleetQuery,
        refusals=(*WINDOW_REFUSALS, "invalid_cursor (belongs to a different window)"),
    ),
    Operation(
        "PUT",
        "/v1/vehicles/{vehicleId}/meter",
        "assignMeter",
        "Assign a meter to the vehicle from a time on (closing the previous one)",
        put_assignment,
        {
            200: Answer("The same assignment already existed.", Assignment),
            201: Answer("The assignment was created.", Assignment),
            403: Answer(
                "read_only: the API's database role may not write (a read-only login or "
                "a replica); nothing was changed."
            ),
            409: Answer("assignment_conflict: it contradicts a later assignment."),
            503: _DB_UNAVAILABLE,
        },
        path_params=VehiclePath,
        body=AssignmentRequest,
    ),
    Operation(
        "GET",
        "/v1/vehicles/{vehicleId}/meter",
        "vehicleMeters",
        "The vehicle's meter assignments, oldest first",
        get_assignments,
        {
            200: Answer("The assignments (empty when none).", Assignments),
            503: _DB_UNAVAILABLE,
        },
        path_params=VehiclePath,
    ),
    live_operation(Live("vehicle", sql.VEHICLE_LIVE, VehicleLive), VehiclePath),
    live_operation(Live("meter", sql.METER_LIVE, MeterLive), MeterPath),
]


def analytics_routes() -> list[web.RouteDef]:
    return routes_of(OPERATIONS)
