"""The fleet report reads the hourly totals the sessions worker keeps (sql/014): it must
answer exactly what history says.

Readings go through the real consumer and the worker's cycles, late and re-sent ones
included; meters change mid-hour. Every page of the report is compared with the same
report computed from history alone, before and after the data changes under a ranking the
API keeps between pages.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from consumer.api.analytics import analytics_routes
from consumer.api.app import make_app
from consumer.api.deps import ApiDeps
from consumer.settings import Settings
from devtools.factories import BASE_TIME, meter, vehicle
from tests.integration.test_sessions import ingest, sessionize

FLEET = "/v1/analytics/fleet/efficiency"
VEHICLES = 12

# The report as it was computed before the hourly totals: every reading of the window,
# from history. $1..$3 thresholds, $4 from, $5 to.
FROM_HISTORY = """
WITH spans AS (
    SELECT vehicle_id, meter_id, greatest(valid_from, $4) AS lo, least(coalesce(valid_to, $5), $5) AS hi
      FROM vehicle_meter_assignments
     WHERE valid_from < $5 AND (valid_to IS NULL OR valid_to > $4)
),
vehicle AS (
    SELECT vehicle_id, sum(kwh_delivered_dc) AS dc FROM vehicle_history
     WHERE "timestamp" >= $4 AND "timestamp" < $5 AND vehicle_id IN (SELECT vehicle_id FROM spans)
     GROUP BY vehicle_id
),
meter AS (
    SELECT s.vehicle_id, coalesce(sum(h.kwh_consumed_ac), 0) AS ac
      FROM spans s
      LEFT JOIN meter_history h ON h.meter_id = s.meter_id AND h."timestamp" >= s.lo AND h."timestamp" < s.hi
     GROUP BY s.vehicle_id
),
ids AS (
    SELECT vehicle_id, array_agg(meter_id ORDER BY first_used) AS ids
      FROM (SELECT vehicle_id, meter_id, min(lo) AS first_used FROM spans GROUP BY 1, 2) u
     GROUP BY vehicle_id
),
rated AS (
    SELECT v.vehicle_id, i.ids, v.dc, m.ac, CASE WHEN m.ac > 0 THEN round(v.dc / m.ac, 4) END AS ratio
      FROM vehicle v JOIN meter m USING (vehicle_id) JOIN ids i USING (vehicle_id)
)
SELECT vehicle_id, ids, round(dc, 3) AS dc, round(ac, 3) AS ac, ratio,
       fleet_efficiency_status(true, ac, ratio, $1, $2, $3) AS status
  FROM rated
 ORDER BY ratio ASC NULLS LAST, vehicle_id
"""


@pytest.fixture
async def client(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[TestClient[Any, Any]]:
    app = make_app({}, deps=ApiDeps(settings, pool=pool), routes=analytics_routes())
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


def fleet(minutes: range) -> list[dict[str, Any]]:
    """Vehicle i and meter i every 7 minutes over `minutes`, energies varying by device."""
    readings: list[dict[str, Any]] = []
    for minute in minutes:
        for i in range(VEHICLES):
            dc = 0 if (minute // 7 + i) % 5 == 0 else round(0.4 + 0.05 * i + 0.001 * minute, 3)
            readings.append(vehicle(f"v-{i}", minute, kwhDeliveredDc=dc))
            readings.append(meter(f"m-{i}", minute, kwhConsumedAc=round(0.5 + 0.01 * i, 3)))
    return readings


async def assign(db: asyncpg.Connection) -> None:
    """v-i on m-i; v-0 moves to m-1 at minute 95; v-2 is on m-5 for minutes 130-150 only,
    inside one hour: assignments that start and end mid-hour."""
    at = [BASE_TIME + timedelta(minutes=m) for m in (95, 130, 150)]
    rows = [(f"v-{i}", f"m-{i}", BASE_TIME - timedelta(days=1), None) for i in range(3, VEHICLES)]
    rows += [
        ("v-0", "m-0", BASE_TIME - timedelta(days=1), at[0]),
        ("v-0", "m-1", at[0], None),
        ("v-1", "m-1", BASE_TIME - timedelta(days=1), None),
        ("v-2", "m-2", BASE_TIME - timedelta(days=1), at[1]),
        ("v-2", "m-5", at[1], at[2]),
        ("v-2", "m-2", at[2], None),
    ]
    await db.executemany(
        "INSERT INTO vehicle_meter_assignments (vehicle_id, meter_id, valid_from, valid_to) "
        "VALUES ($1, $2, $3, $4)",
        rows,
    )


async def report_pages(
    client: TestClient[Any, Any], start: datetime, to: datetime, **filters: str
) -> Any:
    """The whole report over [start, to), page by page (4 a page), and the window it covered."""
    params = {"from": start.isoformat(), "to": to.isoformat(), "limit": "4", **filters}
    rows: list[dict[str, Any]] = []
    while True:
        resp = await client.get(FLEET, params=params)
        body = await resp.json()
        assert resp.status == 200, body
        rows += body["vehicles"]
        if body["nextCursor"] is None:
            return rows, (body["from"], body["to"])
        params = {"limit": "4", "cursor": body["nextCursor"], **filters}


async def from_history(
    db: asyncpg.Connection, settings: Settings, start: datetime, to: datetime
) -> list[dict[str, Any]]:
    rows = await db.fetch(FROM_HISTORY, *settings.efficiency_thresholds, start, to)
    return [
        {
            "vehicleId": r["vehicle_id"],
            "meterIds": list(r["ids"]),
            "totalKwhDeliveredDc": float(r["dc"]),
            "totalKwhConsumedAc": float(r["ac"]),
            "efficiencyRatio": None if r["ratio"] is None else float(r["ratio"]),
            "status": r["status"],
        }
        for r in rows
    ]


def whole_hours(start: datetime, to: datetime) -> tuple[datetime, datetime]:
    floor = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    ceiling = to.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return floor, ceiling if ceiling == to else ceiling + timedelta(hours=1)


async def test_the_fleet_report_from_hourly_totals_equals_the_report_from_history(
    settings: Settings, pool: asyncpg.Pool, db: asyncpg.Connection, client: TestClient[Any, Any]
) -> None:
    """In order, then late into earlier hours and re-sent: after the worker's cycles, every
    window's report (widened to whole UTC hours) is the one history gives, row for row."""
    await assign(db)
    await ingest(settings, fleet(range(60, 300, 7)))
    await sessionize(pool, settings)
    everything = whole_hours(BASE_TIME - timedelta(hours=1), BASE_TIME + timedelta(hours=6))
    rows, _ = await report_pages(client, *everything)  # ranked now, kept by the API
    assert rows == await from_history(db, settings, *everything)
    late = fleet(range(0, 60, 7))  # the first hour arrives last
    resent = fleet(range(60, 130, 7))  # stored once: changes nothing
    await ingest(settings, late + resent)
    await sessionize(pool, settings)

    windows = [
        (BASE_TIME - timedelta(hours=1), BASE_TIME + timedelta(hours=6)),  # everything
        (BASE_TIME + timedelta(minutes=13), BASE_TIME + timedelta(minutes=187)),  # ragged
        (BASE_TIME + timedelta(minutes=125), BASE_TIME + timedelta(minutes=155)),  # v-2's m-5
    ]
    reports = []
    for start, to in windows:
        covered = whole_hours(start, to)
        rows, window = await report_pages(client, start, to)
        assert window == (covered[0].isoformat(), covered[1].isoformat())
        expected = await from_history(db, settings, *covered)
        assert len(expected) == VEHICLES
        assert rows == expected
        reports.append(rows)
    meters = {r["vehicleId"]: r["meterIds"] for r in reports[0]}
    assert (meters["v-0"], meters["v-2"]) == (["m-0", "m-1"], ["m-2", "m-5"])

    # A status filter cuts the same ranking.
    for status in {r["status"] for r in reports[0]}:
        rows, _ = await report_pages(client, *everything, status=status)
        assert rows == [r for r in reports[0] if r["status"] == status]

    # A meter assignment changes the kept ranking too.
    moved = await client.put(
        "/v1/vehicles/v-3/meter",
        json={"meterId": "m-9", "from": (BASE_TIME + timedelta(minutes=200)).isoformat()},
    )
    assert moved.status == 201, await moved.text()
    rows, _ = await report_pages(client, *everything)
    assert rows == await from_history(db, settings, *everything)
    assert {r["vehicleId"]: r["meterIds"] for r in rows}["v-3"] == ["m-3", "m-9"]
