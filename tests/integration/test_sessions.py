"""Charging sessions and alerts, through the real consumer, the sessions worker and Kafka.

Readings are published to the broker and stored by the real service; the sessions worker
then runs its cycles against the same database. Session boundaries, energies and alerts are
checked against what the readings say, late and re-sent readings included, and against a
from-scratch recomputation over history.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaConsumer

from consumer.alerts import AlertPublisher
from consumer.api.app import make_app
from consumer.api.deps import ApiDeps
from consumer.api.operation import routes_of
from consumer.api.sessions import OPERATIONS
from consumer.sessions import SessionWorker
from consumer.settings import Settings
from devtools.factories import BASE_TIME, meter, vehicle
from tests.integration.helpers import consume_until_idle, publish_readings, publish_to_partition

SESSION_FIELDS = (
    "session_id, vehicle_id, meter_id, started_at, ended_at, state, kwh_delivered_dc, "
    "kwh_consumed_ac, efficiency_ratio, status, soc_start, soc_end, max_battery_temp, readings"
)


async def ingest(
    settings: Settings, readings: list[dict[str, Any]], partition: int | None = None
) -> None:
    """Publish readings to the mixed topic (keyed, or all to one partition) and let the real
    service store them."""
    bootstrap, topic = settings.kafka_bootstrap_servers, settings.mixed_topic
    if partition is None:
        await publish_readings(bootstrap, topic, readings)
    else:
        await publish_to_partition(bootstrap, topic, partition, readings)
    await consume_until_idle(settings, idle_timeout=1.5)


async def sessionize(pool: asyncpg.Pool, settings: Settings) -> None:
    """Run worker cycles until no mark is left."""
    worker = SessionWorker(pool, settings)
    for _ in range(20):
        await worker.cycle()
        if not await pool.fetchval("SELECT count(*) FROM batch_marks"):
            return
    raise AssertionError("marks left after 20 cycles")


async def sessions(db: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await db.fetch(f"SELECT {SESSION_FIELDS} FROM charging_sessions ORDER BY started_at")
    return [dict(r) for r in rows]


async def assign(db: asyncpg.Connection, vehicle_id: str, meter_id: str) -> None:
    await db.execute(
        "INSERT INTO vehicle_meter_assignments (vehicle_id, meter_id, valid_from) VALUES ($1, $2, $3)",
        vehicle_id,
        meter_id,
        BASE_TIME - timedelta(hours=1),
    )


def charging(device: str, minutes: range, dc: float = 1.0, **fields: Any) -> list[dict[str, Any]]:
    return [
        vehicle(device, m, kwhDeliveredDc=dc, soc=20.0 + m, batteryTemp=25.0 + m / 10, **fields)
        for m in minutes
    ]


def parked(device: str, minutes: range) -> list[dict[str, Any]]:
    return [vehicle(device, m, kwhDeliveredDc=0.0, soc=60.0, batteryTemp=20.0) for m in minutes]


def metered(device: str, minutes: range, ac: float) -> list[dict[str, Any]]:
    return [meter(device, m, kwhConsumedAc=ac) for m in minutes]


async def test_sessions_are_islands_of_delivering_readings_with_their_meters_energy(
    settings: Settings, pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """Two charges 15 minutes apart are two sessions: the first closed by the watermark,
    the second still open; each has its DC, its meter's AC over its span, ratio and status."""
    await assign(db, "v-1", "m-1")
    readings = [
        *charging("v-1", range(5)),
        *parked("v-1", range(5, 20)),
        *charging("v-1", range(20, 25)),
        *parked("v-1", range(25, 31)),
        *metered("m-1", range(31), ac=1.1),
    ]
    await ingest(settings, readings)
    await sessionize(pool, settings)

    first, second = await sessions(db)
    assert (first["started_at"], first["ended_at"]) == (BASE_TIME, BASE_TIME + timedelta(minutes=4))
    assert first["state"] == "closed"  # watermark 28 min (newest 30, less 2 of lateness)
    assert second["state"] == "open"  # ended at 24: the 10-minute gap has not elapsed
    assert first["kwh_delivered_dc"] == Decimal("5.000")
    assert first["kwh_consumed_ac"] == Decimal("5.500")  # the meter's readings at 0..4
    assert first["efficiency_ratio"] == Decimal("0.9091")
    assert first["status"] == "normal"
    assert (first["soc_start"], first["soc_end"], first["readings"]) == (20, 24, 5)
    assert first["max_battery_temp"] == Decimal("25.40")
    assert first["meter_id"] == "m-1"


async def test_late_and_resent_readings_give_what_a_recomputation_from_history_gives(
    settings: Settings, pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """A late reading in the gap merges two sessions (the first keeps its id), a late meter
    reading updates the AC side, a re-sent reading changes nothing, and the rows equal a
    recomputation from scratch."""
    await assign(db, "v-1", "m-1")
    await ingest(
        settings,
        [
            *charging("v-1", range(5)),
            *charging("v-1", range(16, 21)),
            *parked("v-1", range(21, 45)),
            *metered("m-1", [m for m in range(45) if m != 18], ac=1.2),
        ],
    )
    await sessionize(pool, settings)
    split = await sessions(db)
    assert [s["readings"] for s in split] == [5, 5]

    await ingest(settings, [*charging("v-1", range(10, 11)), *metered("m-1", range(18, 19), 1.2)])
    await sessionize(pool, settings)
    (merged,) = await sessions(db)
    assert merged["session_id"] == split[0]["session_id"]
    assert (merged["readings"], merged["kwh_delivered_dc"]) == (11, Decimal("11.000"))
    assert merged["kwh_consumed_ac"] == Decimal("25.200")  # minutes 0..20, 18 included

    await ingest(settings, charging("v-1", range(3, 4)))  # re-sent: stored once
    await sessionize(pool, settings)
    assert await sessions(db) == [merged]

    await db.execute("DELETE FROM charging_sessions")
    await db.execute(  # every vehicle marked from its first reading: a full recomputation
        "INSERT INTO batch_marks (meter_ids, meter_ts, vehicle_ids, vehicle_ts, vehicle_temps) "
        "SELECT '{}', '{}', array_agg(vehicle_id), array_agg(first), array_agg(0) "
        'FROM (SELECT vehicle_id, min("timestamp") AS first FROM vehicle_history GROUP BY 1) v'
    )
    await sessionize(pool, settings)
    assert await sessions(db) == [merged]


async def alert_rows(db: asyncpg.Connection) -> list[tuple[str, str, str]]:
    rows = await db.fetch("SELECT kind, subject, state FROM alerts ORDER BY kind, subject")
    return [tuple(r) for r in rows]


async def test_a_failing_charger_gets_one_alert_and_its_transition_reaches_kafka_once_by_id(
    settings: Settings, pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """Three closed sessions at 0.70 open charger_efficiency_low for that meter only; the
    transition is published keyed by meter, and a send repeated after a crash carries the
    same transition id."""
    readings: list[dict[str, Any]] = []
    for device, ac in (("bad", 1.0 / 0.7), ("good", 1.0 / 0.92)):
        await assign(db, f"v-{device}", f"m-{device}")
        for start in (0, 20, 40):
            readings += charging(f"v-{device}", range(start, start + 5))
            readings += parked(f"v-{device}", range(start + 5, start + 20))
            readings += metered(f"m-{device}", range(start, start + 5), ac=round(ac, 3))
            readings += metered(f"m-{device}", range(start + 5, start + 20), ac=0.0)
        readings += parked(f"v-{device}", range(60, 80))
    await ingest(settings, readings)
    await sessionize(pool, settings)

    low = [a for a in await alert_rows(db) if a[0] == "charger_efficiency_low"]
    assert low == [("charger_efficiency_low", "m-bad", "open")]
    evidence = json.loads(await db.fetchval("SELECT evidence FROM alerts WHERE subject = 'm-bad'"))
    assert len(evidence["sessionIds"]) == 3 and evidence["averageEfficiency"] == pytest.approx(
        0.7, abs=0.001
    )
    health = await db.fetch("SELECT meter_id, status FROM charger_health ORDER BY average")
    assert [tuple(h) for h in health] == [("m-bad", "fault"), ("m-good", "normal")]

    publisher = AlertPublisher(pool, await started_producer(settings), settings)
    try:
        await publisher.publish_once()  # what the service's own publisher has not sent yet
        assert not await db.fetchval(
            "SELECT count(*) FROM alert_transitions WHERE published_at IS NULL"
        )
        await db.execute("UPDATE alert_transitions SET published_at = NULL")  # as if it crashed
        assert await publisher.publish_once() >= 1  # before stamping: everything sent again
    finally:
        await publisher.producer.stop()
    messages = await read_topic(settings, settings.alerts_topic)
    low_messages = [m for m in messages if m["kind"] == "charger_efficiency_low"]
    assert len(low_messages) == 2  # sent twice ...
    assert len({m["transitionId"] for m in low_messages}) == 1  # ... as one transition
    assert low_messages[0]["subject"] == "m-bad" and low_messages[0]["state"] == "open"


async def started_producer(settings: Settings) -> Any:
    from consumer.kafka import make_producer  # noqa: PLC0415 -- only this test sends

    producer = make_producer(settings)
    await producer.start()
    return producer


async def read_topic(settings: Settings, topic: str) -> list[dict[str, Any]]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        out: list[dict[str, Any]] = []
        while True:
            batch = await consumer.getmany(timeout_ms=2000)
            if not batch:
                return out
            out += [json.loads(r.value) for records in batch.values() for r in records]
    finally:
        await consumer.stop()


async def test_overheat_opens_on_consecutive_hot_readings_and_resolves_when_cool(
    settings: Settings, pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """55 degC once is not an alert; twice in a row is; below 50 resolves it."""
    temps = [30, 56, 40, 55, 57, 53, 45, 30]
    readings = [
        vehicle("v-hot", m, kwhDeliveredDc=0.0, batteryTemp=float(t)) for m, t in enumerate(temps)
    ]
    await ingest(settings, readings)
    await sessionize(pool, settings)
    transitions = await db.fetch(
        "SELECT t.state, t.at FROM alert_transitions t JOIN alerts a USING (alert_id) "
        "WHERE a.kind = 'battery_overheat' ORDER BY t.seq"
    )
    assert [(t["state"], t["at"]) for t in transitions] == [
        ("open", BASE_TIME + timedelta(minutes=4)),
        ("resolved", BASE_TIME + timedelta(minutes=6)),
    ]


async def test_a_device_that_stops_reporting_is_silent_until_it_reports_again(
    settings: Settings, pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """Silence is judged against how far its partition has been read: the two meters share
    one here, as thousands of devices do in a fleet."""
    readings = [*metered("m-quiet", range(3), 1.0), *metered("m-busy", range(40), 1.0)]
    await ingest(settings, readings, partition=0)
    await sessionize(pool, settings)
    assert await alert_rows(db) == [("device_silent", "m-quiet", "open")]

    await ingest(settings, metered("m-quiet", range(40, 41), 1.0), partition=0)
    await sessionize(pool, settings)
    assert await alert_rows(db) == [("device_silent", "m-quiet", "resolved")]


@pytest.fixture
async def client(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[TestClient[Any, Any]]:
    app = make_app({}, deps=ApiDeps(settings, pool=pool), routes=routes_of(OPERATIONS))
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def test_sessions_chargers_and_alerts_through_the_api(
    settings: Settings, pool: asyncpg.Pool, db: asyncpg.Connection, client: TestClient[Any, Any]
) -> None:
    """Sessions page newest first with a cursor, one session by id, charger health worst
    first, and acknowledging an alert changes it in the database, with its transition."""
    await assign(db, "v-1", "m-1")
    readings = []
    for start in (0, 20, 40):
        readings += charging("v-1", range(start, start + 5))
        readings += parked("v-1", range(start + 5, start + 20))
        readings += metered("m-1", range(start, start + 20), ac=0.3)
    await ingest(settings, [*readings, *parked("v-1", range(60, 75))])
    await sessionize(pool, settings)

    page = await (await client.get("/v1/vehicles/v-1/sessions", params={"limit": "2"})).json()
    assert [s["startedAt"] for s in page["sessions"]] == [
        (BASE_TIME + timedelta(minutes=40)).isoformat(),
        (BASE_TIME + timedelta(minutes=20)).isoformat(),
    ]
    rest = await (
        await client.get("/v1/vehicles/v-1/sessions", params={"cursor": page["nextCursor"]})
    ).json()
    assert [s["startedAt"] for s in rest["sessions"]] == [BASE_TIME.isoformat()]
    assert rest["nextCursor"] is None
    one = rest["sessions"][0]
    assert (await (await client.get(f"/v1/sessions/{one['sessionId']}")).json()) == one
    assert one["meterId"] == "m-1" and one["status"] == "anomalous"  # 5 DC for 1.5 AC
    by_meter = await (await client.get("/v1/meters/m-1/sessions")).json()
    assert len(by_meter["sessions"]) == 3

    health = await (await client.get("/v1/chargers/health")).json()
    assert health["chargers"][0]["meterId"] == "m-1"
    assert health["chargers"][0]["openAlerts"] == ["meter_overreporting"]

    alerts = await (await client.get("/v1/alerts", params={"kind": "meter_overreporting"})).json()
    (alert,) = alerts["alerts"]
    acked = await client.post(f"/v1/alerts/{alert['alertId']}/ack")
    assert acked.status == 200
    assert (await acked.json())["state"] == "acknowledged"
    assert await db.fetchval("SELECT state FROM alerts WHERE alert_id = $1", alert["alertId"]) == (
        "acknowledged"
    )
    assert (await client.post(f"/v1/alerts/{alert['alertId']}/ack")).status == 200  # again: same
    states = await db.fetch(
        "SELECT state FROM alert_transitions WHERE alert_id = $1 ORDER BY seq", alert["alertId"]
    )
    assert [s["state"] for s in states] == ["open", "acknowledged"]

    for path, status, code in (
        ("/v1/sessions/not-a-uuid", 400, "invalid_session_id"),
        ("/v1/sessions/00000000-0000-0000-0000-000000000000", 404, "session_not_found"),
        ("/v1/vehicles/v-1/sessions?cursor=bm9wZQ", 400, "invalid_cursor"),
        ("/v1/alerts?state=gone", 400, "invalid_state"),
    ):
        response = await client.get(path)
        assert (response.status, (await response.json())["error"]["code"]) == (status, code)
    missing = await client.post("/v1/alerts/00000000-0000-0000-0000-000000000000/ack")
    assert missing.status == 404
