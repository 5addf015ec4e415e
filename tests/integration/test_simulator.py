"""The simulator with faults, through the real broker and consumer, checked against its truth."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg

from consumer.api.analytics_sql import PERFORMANCE
from consumer.settings import Settings
from producer_sim.__main__ import publish
from producer_sim.assignments import write_assignments
from producer_sim.faults import Faults, Truth
from producer_sim.fleet import Fleet
from tests.integration.helpers import consume_until_idle

INTERVAL = timedelta(minutes=1)
ROUNDS = 120
THRESHOLDS = (Decimal("0.5"), Decimal("0.85"), Decimal("1.0"))  # min AC kWh, fault, anomalous
ENOUGH_AC_KWH = Decimal("1.0")  # below this, standby draw alone can pull a healthy ratio down
FAULTS = Faults(
    failing_chargers=0.1,  # 4 of 40, from the middle of the run
    bad_messages=0.01,
    duplicates=0.01,
    late=0.01,
    skewed_devices=0.1,
    skew=timedelta(seconds=30),  # less than a round: windows on round times stay exact
)


async def test_the_platform_agrees_with_the_simulators_truth(
    settings: Settings, database: str, db: asyncpg.Connection
) -> None:
    """Dead letters equal the injected bad messages by reason, re-sent readings are stored once, and exactly the vehicles of failing chargers are rated fault."""
    # Seed 7: three of its four faulty vehicles charge after the failure.
    fleet = Fleet(meters=40, vehicles=40, seed=7)
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - ROUNDS * INTERVAL
    truth = Truth()
    published = await publish(
        settings.kafka_bootstrap_servers,
        fleet,
        start,
        INTERVAL,
        ROUNDS,
        "mixed",
        settings.meter_topic,
        settings.vehicle_topic,
        settings.mixed_topic,
        False,
        faults=FAULTS,
        truth=truth,
        now=now,
    )
    assert published == truth.messages
    assert await write_assignments(database, fleet.charger, start) == 40
    assert await write_assignments(database, fleet.charger, start) == 0  # a re-run adds nothing
    await consume_until_idle(settings)

    # (a) Every injected bad message is a dead letter with the expected reason.
    rows = await db.fetch("SELECT reason, count(*) AS n FROM dead_letters GROUP BY reason")
    assert {r["reason"]: r["n"] for r in rows} == truth.bad_messages
    assert len(truth.bad_messages) >= 10

    # (b) Duplicates are stored once: one history row per distinct (device, timestamp).
    stored = 0
    for table, id_col in (("meter_history", "meter_id"), ("vehicle_history", "vehicle_id")):
        count, distinct = await db.fetchrow(
            f'SELECT count(*), count(DISTINCT ({id_col}, "timestamp")) FROM {table}'
        )
        assert count == distinct
        stored += count
    assert truth.duplicates > 0
    assert truth.late_readings > 0
    assert stored == truth.readings == ROUNDS * 80

    # (c) After the failure, faulty vehicles that charged are 'fault'; healthy ones are not.
    failed_at = datetime.fromisoformat(next(iter(truth.failing_chargers.values())))
    assert failed_at == start + ROUNDS // 2 * INTERVAL
    end = start + ROUNDS * INTERVAL
    rated_faulty = 0
    for vehicle in fleet.vehicle_ids:
        row = await db.fetchrow(PERFORMANCE, *THRESHOLDS, vehicle, failed_at, end, None)
        assert row["meter_ids"] == [fleet.charger[vehicle]]
        if vehicle in truth.faulty_vehicles:
            if row["status"] != "insufficient_data":
                rated_faulty += 1
                assert row["status"] == "fault", (vehicle, dict(row))
        elif row["ac"] >= ENOUGH_AC_KWH:
            assert row["status"] == "normal", (vehicle, dict(row))
    assert len(truth.faulty_vehicles) == 4
    assert rated_faulty == 3


async def test_realtime_mode_sends_a_round_per_interval_until_stopped(settings: Settings) -> None:
    """In real time, rounds go out one interval apart, and a stop ends the run after the round in hand."""
    fleet = Fleet(meters=2, vehicles=2, seed=1)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.call_later(1.5, stop.set)  # between round 1 (t = 1 s) and round 2 (t = 2 s)
    began = loop.time()
    published = await publish(
        settings.kafka_bootstrap_servers,
        fleet,
        datetime.now(UTC),
        timedelta(seconds=1),
        10,
        "dedicated",
        settings.meter_topic,
        settings.vehicle_topic,
        settings.mixed_topic,
        False,
        realtime=True,
        stop=stop,
    )
    assert published == 2 * 4  # rounds 0 and 1, every device once each
    assert loop.time() - began >= 1.4  # paced by the interval, not as fast as possible
