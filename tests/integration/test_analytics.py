"""The analytics read side over HTTP, against a real PostgreSQL, with totals known by construction."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from pydantic import SecretStr

from consumer.api import analytics_sql
from consumer.api.analytics import analytics_routes
from consumer.api.app import make_app
from consumer.api.deps import ApiDeps
from consumer.settings import Settings

# Inside last month: a prepared partition of its own, whatever today's date is.
_THIS_MONTH = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
T0 = (_THIS_MONTH - timedelta(days=1)).replace(day=10)
HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat()


def window(start: datetime = T0, end: datetime = T0 + HOUR, **extra: str) -> dict[str, str]:
    return {"from": iso(start), "to": iso(end), **extra}


async def add_vehicle(
    db: asyncpg.Connection,
    vehicle: str,
    kwh: str,
    *,
    count: int = 10,
    start: datetime = T0,
    temp: str = "25.00",
    step: timedelta = MINUTE,
) -> None:
    await db.execute(
        'INSERT INTO vehicle_history (vehicle_id, soc, kwh_delivered_dc, battery_temp, "timestamp") '
        "SELECT $1, 50, $2::numeric, $3::numeric, $4::timestamptz + i * $5::interval "
        "FROM generate_series(0, $6 - 1) i",
        vehicle,
        kwh,
        temp,
        start,
        step,
        count,
    )
    await keep_hourly_totals(db, vehicles=[(vehicle, start)])


async def keep_hourly_totals(
    db: asyncpg.Connection,
    *,
    vehicles: Sequence[tuple[str, datetime]] = (),
    meters: Sequence[tuple[str, datetime]] = (),
) -> None:
    """What the sessions worker does once a batch with these devices' readings from these
    times on has committed: recompute their hourly totals (sql/014), which the fleet
    report reads."""
    await db.execute(
        "SELECT fleet_refresh_hourly($1, $2, $3, $4)",
        [v for v, _ in vehicles],
        [t for _, t in vehicles],
        [m for m, _ in meters],
        [t for _, t in meters],
    )


async def add_meter(
    db: asyncpg.Connection,
    meter: str,
    kwh: str,
    *,
    count: int = 10,
    start: datetime = T0,
    step: timedelta = MINUTE,
) -> None:
    await db.execute(
        'INSERT INTO meter_history (meter_id, kwh_consumed_ac, voltage, "timestamp") '
        "SELECT $1, $2::numeric, 230, $3::timestamptz + i * $4::interval FROM generate_series(0, $5 - 1) i",
        meter,
        kwh,
        start,
        step,
        count,
    )
    await keep_hourly_totals(db, meters=[(meter, start)])


async def assign(
    db: asyncpg.Connection,
    vehicle: str,
    meter: str,
    start: datetime = T0 - timedelta(days=1),
    end: datetime | None = None,
) -> None:
    await db.execute(
        "INSERT INTO vehicle_meter_assignments (vehicle_id, meter_id, valid_from, valid_to) "
        "VALUES ($1, $2, $3, $4)",
        vehicle,
        meter,
        start,
        end,
    )


async def linked_vehicle(
    db: asyncpg.Connection, vehicle: str, dc_each: str, ac_each: str | None
) -> None:
    """Ten readings on each side in [T0, T0+10min); ac_each None: the meter saw nothing."""
    meter = f"m-{vehicle}"
    await add_vehicle(db, vehicle, dc_each)
    if ac_each is not None:
        await add_meter(db, meter, ac_each)
    await assign(db, vehicle, meter)


@pytest.fixture
async def client(database: str) -> AsyncIterator[TestClient[Any, Any]]:
    pool = await asyncpg.create_pool(database, min_size=1, max_size=4)
    app = make_app(
        {},
        deps=ApiDeps(Settings(database_url=SecretStr(database)), pool=pool),
        routes=analytics_routes(),
    )
    try:
        async with TestClient(TestServer(app)) as test_client:
            yield test_client
    finally:
        await pool.close()


async def get_json(
    client: TestClient[Any, Any], path: str, params: dict[str, str] | None = None, expect: int = 200
) -> Any:
    resp = await client.get(path, params=params)
    body = await resp.json()
    assert resp.status == expect, body
    return body


async def error_code(
    client: TestClient[Any, Any], path: str, expect: int, params: dict[str, str] | None = None
) -> str:
    body = await get_json(client, path, params, expect)
    message = body["error"]["message"]
    assert "select" not in message.lower()
    assert "vehicle_history" not in message
    assert "meter_history" not in message
    return str(body["error"]["code"])


# --- performance -------------------------------------------------------------------------


async def test_linked_vehicle_reports_totals_ratio_and_status(
    client: TestClient[Any, Any], db: asyncpg.Connection
) -> None:
    """A vehicle charging at its assigned meter gets DC, AC, mean temperature, ratio and counts."""
    await add_vehicle(db, "v-1", "1.800", temp="20.00", count=5)
    await add_vehicle(db, "v-1", "1.800", temp="25.01", count=5, start=T0 + 5 * MINUTE)
    await add_meter(db, "m-1", "2.000")
    await assign(db, "v-1", "m-1")
    body = await get_json(client, "/v1/analytics/performance/v-1", window())
    assert body == {
        "vehicleId": "v-1",
        "from": iso(T0),
        "to": iso(T0 + HOUR),
        "meterIds": ["m-1"],
        "totalKwhDeliveredDc": 18.0,
        "totalKwhConsumedAc": 20.0,
        "avgBatteryTemp": 22.51,  # 22.505 rounded half away from zero, in NUMERIC
        "efficiencyRatio": 0.9,
        "status": "normal",
        "vehicleReadings": 10,
        "meterReadings": 10,
    }
    assert body["from"].endswith("+00:00")


@pytest.mark.parametrize(
    ("dc_each", "ac_each", "ratio", "status"),
    [
        ("1.800", "2.000", 0.9, "normal"),
        ("1.700", "2.000", 0.85, "normal"),  # the boundary itself is healthy
        ("2.000", "2.000", 1.0, "normal"),
        ("1.600", "2.000", 0.8, "fault"),
        ("2.200", "2.000", 1.1, "anomalous"),
        ("0.025", "0.030", 0.8333, "insufficient_data"),  # AC 0.3 kWh < 0.5
        ("0.025", None, None, "insufficient_data"),  # the meter saw nothing: no ratio
    ],
)
async def test_status_follows_the_ratio_thresholds(
    client: TestClient[Any, Any],
    db: asyncpg.Connection,
    *,
    dc_each: str,
    ac_each: str | None,
    ratio: float | None,
    status: str,
) -> None:
    """Ratio DC/AC (4 places) maps to normal, fault (< 0.85), anomalous (> 1.0) or insufficient data."""
    await linked_vehicle(db, "v-1", dc_each, ac_each)
    body = await get_json(client, "/v1/analytics/performance/v-1", window())
    assert (body["efficiencyRatio"], body["status"]) == (ratio, status)
    assert body["totalKwhConsumedAc"] == (0.0 if ac_each is None else float(Decimal(ac_each) * 10))


async def test_vehicle_without_assignment_is_unlinked(
    client: TestClient[Any, Any], db: asyncpg.Connection
) -> None:
    """No meter known for the window: status unlinked, AC and ratio null, DC still reported."""
    await add_vehicle(db, "v-1", "1.000")
    await assign(db, "v-1", "m-old", T0 - 2 * HOUR, T0)  # ended exactly as the window starts
    body = await get_json(client, "/v1/analytics/performance/v-1", window())
    assert body["status"] == "unlinked"
    assert body["meterIds"] == []
    assert (body["totalKwhConsumedAc"], body["efficiencyRatio"]) == (None, None)
    assert (body["totalKwhDeliveredDc"], body["meterReadings"]) == (10.0, 0)


async def test_vehicle_moved_between_meters_counts_each_meter_only_while_assigned(
    client: TestClient[Any, Any], db: asyncpg.Connection
) -> None:
    """Moved from A to B mid-window: A's energy before the move and B's after, nothing else."""
    # Both meters report every minute from 10 minutes before to 10 after the window.
    await add_meter(db, "m-A", "1.000", count=80, start=T0 - 10 * MINUTE)
    await add_meter(db, "m-B", "0.500", count=80, start=T0 - 10 * MINUTE)
    # One reading on each edge: `from` is inside the window, `to` is not.
    await add_vehicle(db, "v-1", "0.700", count=62, start=T0 - MINUTE)
    for meter, start in (("m-A", T0 - timedelta(days=1)), ("m-B", T0 + 30 * MINUTE)):
        resp = await client.put(
            "/v1/vehicles/v-1/meter", json={"meterId": meter, "from": iso(start)}
        )
        assert resp.status == 201
    body = await get_json(client, "/v1/analytics/performance/v-1", window())
    assert body["meterIds"] == ["m-A", "m-B"]
    assert body["totalKwhConsumedAc"] == 30 * 1.0 + 30 * 0.5
    assert (body["vehicleReadings"], body["meterReadings"]) == (60, 60)
    assert body["totalKwhDeliveredDc"] == 42.0
    assert body["efficiencyRatio"] == 0.9333
    assert body["status"] == "normal"


async def test_meter_id_parameter_overrides_the_assignments(
    client: TestClient[Any, Any], db: asyncpg.Connection
) -> None:
    """meterId=… uses that meter over the whole window, whatever the assignments say."""
    await add_meter(db, "m-A", "1.000", count=60)
    await add_meter(db, "m-B", "9.000", count=60)
    await add_vehicle(db, "v-1", "0.700", count=60)
    await assign(db, "v-1", "m-B")
    body = await get_json(client, "/v1/analytics/performance/v-1", window(meterId="m-A"))
    assert body["meterIds"] == ["m-A"]
    assert (body["totalKwhConsumedAc"], body["meterReadings"]) == (60.0, 60)
    assert (body["efficiencyRatio"], body["status"]) == (0.7, "fault")
    unlinked = await get_json(client, "/v1/analytics/performance/v-1", window(meterId="m-none"))
    assert (unlinked["meterIds"], unlinked["totalKwhConsumedAc"]) == (["m-none"], 0.0)
    assert unlinked["status"] == "insufficient_data"


async def test_vehicle_without_readings_in_the_window_is_404(
    client: TestClient[Any, Any], db: asyncpg.Connection
) -> None:
    """Readings only outside the window (or none at all): 404 vehicle_not_found."""
    await add_vehicle(db, "v-1", "1.000", start=T0 + HOUR)  # the first one sits exactly on `to`
    await assign(db, "v-1", "m-1")
    path = "/v1/analytics/performance/v-1"
    assert await error_code(client, path, 404, window()) == "vehicle_not_found"
    assert await error_code(client, "/v1/analytics/performance/v-x", 404) == "vehicle_not_found"


async def test_default_window_is_the_last_24_hours(
    client: TestClient[Any, Any], db: asyncpg.Connection
) -> None:
    """Without from/to the window is the 24 hours ending now."""
    now = datetime.now(UTC)
    await add_vehicle(db, "v-1", "1.000", count=3, start=now - HOUR)
    await add_vehicle(db, "v-1", "1.000", count=1, start=now - 30 * HOUR)
    body = await get_json(client, "/v1/analytics/performance/v-1")
    start, end = datetime.fromisoformat(body["from"]), datetime.fromisoformat(body["to"])
    assert end - start == timedelta(hours=24)
    assert abs(end - datetime.now(UTC)) < timedelta(seconds=30)
    assert (body["vehicleReadings"], body["status"]) == (3, "unlinked")


async def test_an_unencoded_plus_in_the_offset_is_understood(
    client: TestClient[Any, Any], db: asyncpg.Connection
) -> None:
    """`from=…+01:00` typed into a URL (the + arrives as a space) still means UTC+1."""
    await add_vehicle(db, "v-1", "1.000")
    local = T0.astimezone(UTC).replace(tzinfo=None) + HOUR
    raw = local.isoformat() + "+01:00"
    url = f"/v1/analytics/performance/v-1?from={raw}&to={iso(T0 + HOUR)}&unknown=1"
    assert "+" in url
    body = await get_json(client, url)
    assert (body["from"], body["to"]) == (iso(T0), iso(T0 + HOUR))


@pytest.mark.parametrize(
    ("path", "params", "code"),
    [
        ("v-1", {"from": "yesterday"}, "invalid_from"),
        ("v-1", {"from": "2026-01-01T00:00:00"}, "invalid_from"),  # no offset
        ("v-1", {"from": "1700000000"}, "invalid_from"),  # epoch seconds
        ("v-1", {"to": "soon"}, "invalid_to"),
        ("v-1", {"to": "2026-01-01"}, "invalid_to"),
        ("v-1", window(T0, T0), "invalid_window"),
        ("v-1", window(T0 + HOUR, T0), "invalid_window"),
        ("v-1", window(T0 - timedelta(days=31, seconds=1), T0), "window_too_large"),
        ("v-1", window(meterId=""), "invalid_meter_id"),
        ("v-1", window(meterId="m" * 129), "invalid_meter_id"),
        ("v-1", window(meterId="m\x01"), "invalid_meter_id"),
        ("v%01", window(), "invalid_vehicle_id"),
        ("v" * 129, window(), "invalid_vehicle_id"),
    ],
)
async def test_bad_performance_parameters_are_400_with_a_code(
    client: TestClient[Any, Any],
    db: asyncpg.Connection,
    path: str,
    params: dict[str, str],
    code: str,
) -> None:
    """Each kind of bad parameter has its own error code, and no SQL in the message."""
    await add_vehicle(db, "v-1", "1.000")
    assert await error_code(client, f"/v1/analytics/performance/{path}", 400, params) == code


async def test_a_window_of_exactly_the_maximum_is_accepted(
    client: TestClient[Any, Any], db: asyncpg.Connection
) -> None:
    """A 31-day window is allowed; only longer ones are refused."""
    await add_vehicle(db, "v-1", "1.000")
    body = await get_json(
        client, "/v1/analytics/performance/v-1", window(T0 - timedelta(days=30), T0 + HOUR)
    )
    assert body["vehicleReadings"] == 10


# --- assignments -------------------------------------------------------------------------


async def test_assigning_a_meter_is_created_then_idempotent(
    client: TestClient[Any, Any], db: asyncpg.Connection
) -> None:
    """The first PUT is 201, the same body again is 200 with the same assignment and no change."""
    body = {"meterId": "m-A", "from": "2026-03-01T08:00:00+01:00"}
    expected = {
        "vehicleId": "v-1",
        "meterId": "m-A",
        "from": "2026-03-01T07:00:00+00:00",
        "to": None,
    }
    first = await client.put("/v1/vehicles/v-1/meter", json=body)
    assert (first.status, await first.json()) == (201, expected)
    again = await client.put("/v1/vehicles/v-1/meter", json=body)
    assert (again.status, await again.json()) == (200, expected)
    assert await db.fetchval("SELECT count(*) FROM vehicle_meter_assignments") == 1


async def test_a_new_meter_closes_the_open_assignment_at_its_start(
    client: TestClient[Any, Any],
) -> None:
    """Assigning B from t closes A at t; GET lists both in order, the open one with to null."""
    for meter, start in (("m-A", "2026-03-01T00:00:00Z"), ("m-B", "2026-03-05T12:00:00Z")):
        resp = await client.put("/v1/vehicles/v-1/meter", json={"meterId": meter, "from": start})
        assert resp.status == 201
    body = await get_json(client, "/v1/vehicles/v-1/meter")
    assert body == {
        "vehicleId": "v-1",
        "assignments": [
            {
                "meterId": "m-A",
                "from": "2026-03-01T00:00:00+00:00",
                "to": "2026-03-05T12:00:00+00:00",
            },
            {"meterId": "m-B", "from": "2026-03-05T12:00:00+00:00", "to": None},
        ],
    }


async def test_assignment_conflicts_are_409_and_change_nothing(
    client: TestClient[Any, Any], db: asyncpg.Connection
) -> None:
    """A start before (or at) the open assignment's, or inside a closed one, is assignment_conflict."""
    await assign(db, "v-1", "m-A", datetime(2026, 3, 10, tzinfo=UTC))
    await assign(
        db, "v-2", "m-A", datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 10, tzinfo=UTC)
    )
    cases = [
        ("v-1", "2026-03-09T00:00:00Z"),  # before the open one started
        ("v-1", "2026-03-10T00:00:00Z"),  # same start, another meter
        ("v-2", "2026-03-05T00:00:00Z"),  # inside a closed one
    ]
    before = await db.fetch("SELECT * FROM vehicle_meter_assignments ORDER BY 1, 3")
    for vehicle, start in cases:
        resp = await client.put(
            f"/v1/vehicles/{vehicle}/meter", json={"meterId": "m-B", "from": start}
        )
        assert resp.status == 409
        assert (await resp.json())["error"]["code"] == "assignment_conflict"
    assert await db.fetch("SELECT * FROM vehicle_meter_assignments ORDER BY 1, 3") == before
    after_closed = {"meterId": "m-B", "from": "2026-03-10T00:00:00Z"}
    assert (await client.put("/v1/vehicles/v-2/meter", json=after_closed)).status == 201


async def test_vehicle_without_assignments_lists_none(client: TestClient[Any, Any]) -> None:
    """GET of a vehicle never assigned is 200 with an empty list, not 404."""
    assert await get_json(client, "/v1/vehicles/v-x/meter") == {
        "vehicleId": "v-x",
        "assignments": [],
    }


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"not json", "malformed_json"),
        (b"\xff\xfe", "malformed_json"),
        (b'["m-A"]', "invalid_body"),
        (b'{"meterId": "m-A", "from": "2026-03-01T00:00:00Z", "until": null}', "invalid_body"),
        (b'{"from": "2026-03-01T00:00:00Z"}', "invalid_meter_id"),
        (b'{"meterId": "", "from": "2026-03-01T00:00:00Z"}', "invalid_meter_id"),
        (b'{"meterId": 7, "from": "2026-03-01T00:00:00Z"}', "invalid_meter_id"),
        (b'{"meterId": "m-A"}', "invalid_from"),
        (b'{"meterId": "m-A", "from": "2026-03-01T00:00:00"}', "invalid_from"),
        (b'{"meterId": "m-A", "from": 1772323200}', "invalid_from"),
    ],
)
async def test_bad_assignment_bodies_are_400_with_a_code(
    client: TestClient[Any, Any], db: asyncpg.Connection, body: bytes, code: str
) -> None:
    """A malformed body names what is wrong with it and stores nothing."""
    resp = await client.put(
        "/v1/vehicles/v-1/meter", data=body, headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == code
    assert await db.fetchval("SELECT count(*) FROM vehicle_meter_assignments") == 0


async def test_assignment_with_a_bad_vehicle_id_is_400(client: TestClient[Any, Any]) -> None:
    """The vehicle id in the path follows the same rules as a device's id."""
    body = {"meterId": "m-A", "from": "2026-03-01T00:00:00Z"}
    resp = await client.put(f"/v1/vehicles/{'v' * 129}/meter", json=body)
    assert (resp.status, (await resp.json())["error"]["code"]) == (400, "invalid_vehicle_id")


# --- live --------------------------------------------------------------------------------


async def test_live_endpoints_return_the_newest_reading(
    client: TestClient[Any, Any], db: asyncpg.Connection
) -> None:
    """Vehicle and meter live views use the message's field names plus updatedAt."""
    await db.execute(
        'INSERT INTO vehicle_live (vehicle_id, soc, kwh_delivered_dc, battery_temp, "timestamp", updated_at) '
        "VALUES ('v-1', 55.5, 1.234, -3.25, '2026-03-01T10:00:00+02:00', '2026-03-01T08:00:01Z')"
    )
    await db.execute(
        'INSERT INTO meter_live (meter_id, kwh_consumed_ac, voltage, "timestamp", updated_at) '
        "VALUES ('m-1', 2.5, 231.4, '2026-03-01T08:00:00Z', '2026-03-01T08:00:02Z')"
    )
    assert await get_json(client, "/v1/vehicles/v-1/live") == {
        "vehicleId": "v-1",
        "soc": 55.5,
        "kwhDeliveredDc": 1.234,
        "batteryTemp": -3.25,
        "timestamp": "2026-03-01T08:00:00+00:00",
        "updatedAt": "2026-03-01T08:00:01+00:00",
    }
    assert await get_json(client, "/v1/meters/m-1/live") == {
        "meterId": "m-1",
        "kwhConsumedAc": 2.5,
        "voltage": 231.4,
        "timestamp": "2026-03-01T08:00:00+00:00",
        "updatedAt": "2026-03-01T08:00:02+00:00",
    }


async def test_live_of_an_unknown_device_is_404(client: TestClient[Any, Any]) -> None:
    """A device that never reported: vehicle_not_found / meter_not_found."""
    assert await error_code(client, "/v1/vehicles/v-x/live", 404) == "vehicle_not_found"
    assert await error_code(client, "/v1/meters/m-x/live", 404) == "meter_not_found"
    assert await error_code(client, "/v1/meters/m%01/live", 400) == "invalid_meter_id"


# --- fleet report ------------------------------------------------------------------------

FLEET = "/v1/analytics/fleet/efficiency"


async def test_fleet_report_is_worst_first_with_the_single_vehicle_status(
    client: TestClient[Any, Any], db: asyncpg.Connection
) -> None:
    """Linked vehicles with readings, lowest ratio first, null ratios last, as /performance rates them."""
    await linked_vehicle(db, "v-normal", "1.800", "2.000")
    await linked_vehicle(db, "v-fault", "1.600", "2.000")
    await linked_vehicle(db, "v-anomalous", "2.200", "2.000")
    await linked_vehicle(db, "v-few", "0.025", "0.030")
    await linked_vehicle(db, "v-dark", "0.025", None)
    await add_vehicle(db, "v-unlinked", "1.000")  # readings, no meter: not in the report
    await assign(db, "v-idle", "m-1")  # a meter, no readings: not in the report
    body = await get_json(client, FLEET, window())
    rows = [(v["vehicleId"], v["efficiencyRatio"], v["status"]) for v in body["vehicles"]]
    assert rows == [
        ("v-fault", 0.8, "fault"),
        ("v-few", 0.8333, "insufficient_data"),
        ("v-normal", 0.9, "normal"),
        ("v-anomalous", 1.1, "anomalous"),
        ("v-dark", None, "insufficient_data"),
    ]
    assert (body["from"], body["to"], body["nextCursor"]) == (iso(T0), iso(T0 + HOUR), None)
    assert body["vehicles"][0] == {
        "vehicleId": "v-fault",
        "meterIds": ["m-v-fault"],
        "totalKwhDeliveredDc": 16.0,
        "totalKwhConsumedAc": 20.0,
        "efficiencyRatio": 0.8,
        "status": "fault",
    }
    for v in body["vehicles"]:
        single = await get_json(client, f"/v1/analytics/performance/{v['vehicleId']}", window())
        assert (single["efficiencyRatio"], single["status"]) == (v["efficiencyRatio"], v["status"])


async def test_fleet_report_uses_the_time_aware_assignments(
    client: TestClient[Any, Any], db: asyncpg.Connection
) -> None:
    """A vehicle moved mid-window is rated on A before the move and B after, as in /performance."""
    await add_meter(db, "m-A", "1.000", count=60)
    await add_meter(db, "m-B", "0.500", count=60)
    await add_vehicle(db, "v-1", "0.700", count=60)
    await assign(db, "v-1", "m-A", T0 - HOUR, T0 + 30 * MINUTE)
    await assign(db, "v-1", "m-B", T0 + 30 * MINUTE)
    (row,) = (await get_json(client, FLEET, window()))["vehicles"]
    assert row["meterIds"] == ["m-A", "m-B"]
    assert (row["totalKwhConsumedAc"], row["efficiencyRatio"]) == (45.0, 0.9333)


async def test_fleet_report_filters_by_status(
    client: TestClient[Any, Any], db: asyncpg.Connection
) -> None:
    """status=fault lists only the faulty vehicles."""
    await linked_vehicle(db, "v-normal", "1.800", "2.000")
    await linked_vehicle(db, "v-fault-1", "1.600", "2.000")
    await linked_vehicle(db, "v-fault-2", "1.000", "2.000")
    body = await get_json(client, FLEET, window(status="fault"))
    assert [v["vehicleId"] for v in body["vehicles"]] == ["v-fault-2", "v-fault-1"]
    assert (await get_json(client, FLEET, window(status="unlinked")))["vehicles"] == []


async def test_fleet_cursor_walks_every_page_once_in_order(
    client: TestClient[Any, Any], db: asyncpg.Connection
) -> None:
    """Paging with limit=4 yields the whole report exactly once, ties and nulls included."""
    expected: list[tuple[Decimal | None, str]] = []
    for i in range(23):
        vehicle = f"v-{i:02}"
        if i % 7 == 3:
            await linked_vehicle(db, vehicle, "1.000", None)  # null ratio
            expected.append((None, vehicle))
        else:
            dc = Decimal("1.000") + Decimal("0.050") * (i % 4)  # four ratios, many ties
            await linked_vehicle(db, vehicle, str(dc), "1.250")
            expected.append(((dc / Decimal("1.250")).quantize(Decimal("0.0001")), vehicle))
    expected.sort(key=lambda r: (r[0] is None, r[0] or 0, r[1]))
    seen: list[str] = []
    params = window(limit="4")
    pages = 0
    while True:
        body = await get_json(client, FLEET, params)
        seen += [v["vehicleId"] for v in body["vehicles"]]
        pages += 1
        if body["nextCursor"] is None:
            break
        params = {"limit": "4", "cursor": body["nextCursor"]}  # the cursor carries the window
    assert seen == [vehicle for _, vehicle in expected]
    assert pages == 6
    everything = await get_json(client, FLEET, window(limit="1000"))
    assert [v["vehicleId"] for v in everything["vehicles"]] == seen


async def test_default_fleet_report_pages_over_one_fixed_window(
    client: TestClient[Any, Any], db: asyncpg.Connection
) -> None:
    """Without from/to the second page reuses the first page's window, not a later `now`."""
    now = datetime.now(UTC)
    for vehicle in ("v-1", "v-2"):
        await add_vehicle(db, vehicle, "1.000", count=3, start=now - HOUR)
        await assign(db, vehicle, "m-1")
    first = await get_json(client, FLEET, {"limit": "1"})
    second = await get_json(client, FLEET, {"limit": "1", "cursor": first["nextCursor"]})
    assert (second["from"], second["to"]) == (first["from"], first["to"])
    assert [first["vehicles"][0]["vehicleId"], second["vehicles"][0]["vehicleId"]] == ["v-1", "v-2"]
    assert second["nextCursor"] is None


def forged_cursor(ratio: str, vehicle: str) -> str:
    fields = [iso(T0), iso(T0 + HOUR), ratio, vehicle]
    return base64.urlsafe_b64encode(json.dumps(fields).encode()).decode()


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"status": "broken"}, "invalid_status"),
        ({"limit": "0"}, "invalid_limit"),
        ({"limit": "1001"}, "invalid_limit"),
        ({"limit": "ten"}, "invalid_limit"),
        ({"limit": "-1"}, "invalid_limit"),
        ({"cursor": "not-a-cursor"}, "invalid_cursor"),
        ({"cursor": "WzEsMiwzLDRd"}, "invalid_cursor"),  # base64 of [1,2,3,4]
        ({"cursor": forged_cursor("1e999999", "v-1")}, "invalid_cursor"),
        ({"cursor": forged_cursor("0.9000", "v\u0000")}, "invalid_cursor"),
        ({"from": "nope"}, "invalid_from"),
        ({"to": "nope"}, "invalid_to"),
        (window(T0, T0), "invalid_window"),
        (window(T0 - timedelta(days=32), T0), "window_too_large"),
    ],
)
async def test_bad_fleet_parameters_are_400_with_a_code(
    client: TestClient[Any, Any], params: dict[str, str], code: str
) -> None:
    """Each bad fleet-report parameter has its own error code."""
    assert await error_code(client, FLEET, 400, params) == code


async def test_a_cursor_cannot_be_moved_to_another_window(
    client: TestClient[Any, Any], db: asyncpg.Connection
) -> None:
    """A cursor sent with a different from/to is invalid_cursor; with the same one it works."""
    await linked_vehicle(db, "v-1", "1.800", "2.000")
    await linked_vehicle(db, "v-2", "1.800", "2.000")
    cursor = (await get_json(client, FLEET, window(limit="1")))["nextCursor"]
    same = await get_json(client, FLEET, window(limit="1", cursor=cursor))
    assert [v["vehicleId"] for v in same["vehicles"]] == ["v-2"]
    other = window(T0, T0 + 2 * HOUR, cursor=cursor)
    assert await error_code(client, FLEET, 400, other) == "invalid_cursor"


# --- plans -------------------------------------------------------------------------------


def _scans(plan: dict[str, Any]) -> list[tuple[str, str]]:
    """(node type, relation) of every scan in a JSON plan tree."""
    found = [(plan["Node Type"], plan["Relation Name"])] if "Relation Name" in plan else []
    for child in plan.get("Plans", []):
        found += _scans(child)
    return found


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    text = iso(value) if isinstance(value, datetime) else str(value)
    return "'" + text.replace("'", "''") + "'"


@pytest.mark.parametrize("meter_id", [None, "m-7"])
@pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
async def test_performance_query_reads_history_through_the_device_time_index(
    db: asyncpg.Connection, meter_id: str | None, plan_mode: str
) -> None:
    """On 200k rows a side, both sides of /performance use index scans, never seq scans, on history."""
    await db.execute(
        'INSERT INTO vehicle_history (vehicle_id, soc, kwh_delivered_dc, battery_temp, "timestamp") '
        "SELECT 'v-' || (i % 2000), 50, 1.5, 20, $1::timestamptz + (i / 2000) * interval '1 minute' "
        "FROM generate_series(0, 199999) i",
        T0,
    )
    await db.execute(
        'INSERT INTO meter_history (meter_id, kwh_consumed_ac, voltage, "timestamp") '
        "SELECT 'm-' || (i % 2000), 1.7, 230, $1::timestamptz + (i / 2000) * interval '1 minute' "
        "FROM generate_series(0, 199999) i",
        T0,
    )
    # Every vehicle has a meter; half of them moved to another one mid-window.
    await db.execute(
        "INSERT INTO vehicle_meter_assignments (vehicle_id, meter_id, valid_from, valid_to) "
        "SELECT 'v-' || i, 'm-' || i, $1::timestamptz - interval '1 day', "
        "CASE WHEN i % 2 = 0 THEN $1::timestamptz + interval '50 minutes' END FROM generate_series(0, 1999) i "
        "UNION ALL SELECT 'v-' || i, 'm-' || ((i + 1) % 2000), $1::timestamptz + interval '50 minutes', NULL "
        "FROM generate_series(0, 1999, 2) i",
        T0,
    )
    await db.execute("ANALYZE")
    await db.execute(f"SET plan_cache_mode = {plan_mode}")
    await db.execute(f"PREPARE performance AS {analytics_sql.PERFORMANCE}")
    args = [Decimal("0.5"), Decimal("0.85"), Decimal("1.0"), "v-6", T0, T0 + 2 * HOUR, meter_id]
    execute = f"EXECUTE performance({', '.join(_literal(a) for a in args)})"
    (plan,) = json.loads(await db.fetchval(f"EXPLAIN (FORMAT JSON) {execute}"))
    scans = [(node, rel) for node, rel in _scans(plan["Plan"]) if "_history" in rel]
    assert {rel.split("_history")[0] for _, rel in scans} == {"vehicle", "meter"}, scans
    assert all(
        node in {"Index Scan", "Index Only Scan", "Bitmap Heap Scan"} for node, _ in scans
    ), scans
    row = await db.fetchrow(execute)
    assert row["vehicle_readings"] == 100
    assert row["meter_ids"] == (["m-7"] if meter_id else ["m-6", "m-7"])
    assert row["meter_readings"] == 100
