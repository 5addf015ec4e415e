"""The pipeline end to end: real broker, real PostgreSQL, the real service loop."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime

import aiohttp
import asyncpg
from aiokafka import TopicPartition
from prometheus_client import REGISTRY

from consumer.batch import OffsetRange, build_batch
from consumer.decode import Limits
from consumer.models import MeterReading, Stream
from consumer.service import Service
from consumer.settings import Settings
from consumer.store import Store
from devtools.factories import encode, expected_history, meter, mixed_fleet, vehicle
from tests.conftest import wait_until
from tests.integration.helpers import (
    consume_until_idle,
    dec,
    history_keys,
    newest_by_device,
    offsets_reach,
    publish_readings,
    publish_to_partition,
    running_service,
)


async def test_mixed_stream_lands_exactly_once_and_live_holds_the_newest(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """Every valid reading of a shuffled mixed stream is one history row; live is the newest per device."""
    readings = mixed_fleet(meters=40, vehicles=40, rounds=15)
    random.Random(7).shuffle(readings)  # late and out-of-order arrivals within and across batches
    await publish_readings(settings.kafka_bootstrap_servers, settings.mixed_topic, readings)

    await consume_until_idle(settings)

    meters = await history_keys(db, "meter_history", "meter_id")
    vehicles = await history_keys(db, "vehicle_history", "vehicle_id")
    assert len(meters) == len(set(meters)) == 40 * 15
    assert set(meters) == expected_history(readings, "meterId")
    assert set(vehicles) == expected_history(readings, "vehicleId")
    assert len(vehicles) == 40 * 15

    live = {r["meter_id"]: r for r in await db.fetch("SELECT * FROM meter_live")}
    for device, newest in newest_by_device(readings, "meterId").items():
        assert live[device]["kwh_consumed_ac"] == dec(newest["kwhConsumedAc"])
        assert live[device]["timestamp"].isoformat() == newest["timestamp"]
    vlive = {r["vehicle_id"]: r for r in await db.fetch("SELECT * FROM vehicle_live")}
    assert {d: r["timestamp"].isoformat() for d, r in vlive.items()} == {
        d: r["timestamp"] for d, r in newest_by_device(readings, "vehicleId").items()
    }
    stored = await db.fetch('SELECT topic, "partition", next_offset FROM consumer_offsets')
    assert sum(r["next_offset"] or 0 for r in stored) == len(readings)


async def test_dedicated_topics_are_consumed_by_the_same_group(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """Meter and vehicle topics land in their own tables alongside the mixed topic."""
    await publish_readings(
        settings.kafka_bootstrap_servers, settings.meter_topic, [meter("m-1", i) for i in range(5)]
    )
    await publish_readings(
        settings.kafka_bootstrap_servers,
        settings.vehicle_topic,
        [vehicle("v-1", i) for i in range(5)],
    )
    await consume_until_idle(settings)
    assert await db.fetchval("SELECT count(*) FROM meter_history") == 5
    assert await db.fetchval("SELECT count(*) FROM vehicle_history") == 5


async def test_resent_reading_does_not_double_energy(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """A device re-sending a reading (same timestamp), in the same or a later batch, is stored once."""
    first = [
        meter("m-1", 0, kwhConsumedAc=2.0),
        meter("m-1", 1, kwhConsumedAc=3.0),
        meter("m-1", 1, kwhConsumedAc=3.0),
    ]
    async with running_service(settings):
        await publish_readings(settings.kafka_bootstrap_servers, settings.mixed_topic, first)
        await wait_until(lambda: offsets_reach(db, settings.mixed_topic, 3))
        await publish_readings(
            settings.kafka_bootstrap_servers,
            settings.mixed_topic,
            [meter("m-1", 0, kwhConsumedAc=2.0)],
        )
        await wait_until(lambda: offsets_reach(db, settings.mixed_topic, 4))

    total = await db.fetchval(
        "SELECT sum(kwh_consumed_ac) FROM meter_history WHERE meter_id = 'm-1'"
    )
    assert total == dec(5.0)
    assert await db.fetchval("SELECT count(*) FROM meter_history") == 2


async def test_older_reading_arriving_late_leaves_live_unchanged(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """Newest wins: a late reading with an older timestamp is kept in history but not in live."""
    async with running_service(settings):
        await publish_readings(
            settings.kafka_bootstrap_servers, settings.mixed_topic, [vehicle("v-1", 10, soc=80.0)]
        )
        await wait_until(lambda: offsets_reach(db, settings.mixed_topic, 1))
        await publish_readings(
            settings.kafka_bootstrap_servers, settings.mixed_topic, [vehicle("v-1", 5, soc=40.0)]
        )
        await wait_until(lambda: offsets_reach(db, settings.mixed_topic, 2))

    live = await db.fetchrow("SELECT soc, \"timestamp\" FROM vehicle_live WHERE vehicle_id = 'v-1'")
    assert live["soc"] == 80
    assert live["timestamp"].isoformat() == vehicle("v-1", 10)["timestamp"]
    assert await db.fetchval("SELECT count(*) FROM vehicle_history") == 2


async def test_metrics_and_health_are_served_while_consuming(settings: Settings) -> None:
    """/metrics shows stored readings by stream; /healthz and /readyz answer JSON."""
    await publish_readings(
        settings.kafka_bootstrap_servers, settings.mixed_topic, [meter("m-1", 0), vehicle("v-1", 0)]
    )
    service = Service(settings)
    assert await service.start()
    assert service.pipeline is not None
    try:
        await service.pipeline.run(idle_timeout=1.5)
        base = f"http://127.0.0.1:{settings.http_port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/metrics") as resp:
                text = await resp.text()
            async with http.get(f"{base}/readyz") as resp:
                ready = (resp.status, await resp.json())
            async with http.get(f"{base}/nope") as resp:
                missing = (resp.status, await resp.json())
    finally:
        await service.stop()
    assert 'fleet_ingest_records_total{outcome="stored",stream="meter"}' in text
    assert "fleet_batch_write_duration_seconds_bucket" in text
    assert "fleet_consumer_lag_records{" in text
    checks = {"database": "ok", "sessions_database": "ok", "api_database": "ok", "broker": "ok"}
    assert ready == (200, {"status": "ready", "checks": checks})
    assert missing[0] == 404
    assert missing[1]["error"]["code"] == "not_found"


async def test_reading_the_database_refuses_is_dead_lettered_alone(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """A reading that passes validation but not the database (here: an operator's extra rule)
    becomes a database_rejected dead letter with its source; the rest of its batch lands."""
    await db.execute(
        "ALTER TABLE meter_history ADD CONSTRAINT no_banned CHECK (meter_id <> 'banned')"
    )
    readings = [meter("m-1", 0), meter("banned", 0), vehicle("v-1", 0), meter("m-1", 1)]
    await publish_readings(settings.kafka_bootstrap_servers, settings.mixed_topic, readings)

    await consume_until_idle(settings)

    assert await db.fetchval("SELECT count(*) FROM meter_history") == 2
    assert await db.fetchval("SELECT count(*) FROM vehicle_history") == 1
    letter = await db.fetchrow("SELECT * FROM dead_letters")
    assert letter["reason"] == "database_rejected"
    assert letter["topic"] == settings.mixed_topic
    assert b'"banned"' in letter["payload"]
    assert "no_banned" in letter["detail"]
    assert await db.fetchval("SELECT count(*) FROM meter_live WHERE meter_id = 'banned'") == 0
    stored = await db.fetchval("SELECT sum(next_offset) FROM consumer_offsets")
    assert stored == len(readings)


def batches_over(limit: float) -> float:
    """Committed batches so far with more records than limit (a histogram bucket bound)."""
    total = REGISTRY.get_sample_value("fleet_batch_records_count") or 0.0
    within = REGISTRY.get_sample_value("fleet_batch_records_bucket", {"le": str(limit)}) or 0.0
    return total - within


async def test_no_batch_holds_more_than_the_batch_limit(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """FLEET_BATCH_MAX_RECORDS bounds every batch, also when every waiting record belongs to
    the partitions of one write lane."""
    s = settings.model_copy(update={"batch_max_records": 50, "write_lanes": 2})
    # Partitions 0 and 2 of the mixed topic go to the same one of the two lanes.
    for partition in (0, 2):
        readings = [meter(f"m-{partition}-{i}", minute) for i in range(20) for minute in range(10)]
        await publish_to_partition(s.kafka_bootstrap_servers, s.mixed_topic, partition, readings)
    before = batches_over(50.0)

    await consume_until_idle(s)

    assert await db.fetchval("SELECT count(*) FROM meter_history") == 400
    assert batches_over(50.0) == before


async def test_a_value_the_driver_cannot_encode_is_dead_lettered_not_retried(
    settings: Settings, database: str, db: asyncpg.Connection
) -> None:
    """A reading the driver refuses to encode (validation should make that impossible) would
    fail the same way on every retry: it becomes a database_rejected dead letter and the
    rest of its batch lands, instead of the batch being retried for ever."""
    tp = (settings.mixed_topic, 0)

    class Msg:
        topic, partition, key = settings.mixed_topic, 0, b"m"

        def __init__(self, offset: int, value: bytes) -> None:
            self.offset, self.value = offset, value

    batch = build_batch(
        [Msg(0, encode(meter("m-good", 0))[1])],
        {settings.mixed_topic: None},
        now=datetime.now(UTC),
        limits=Limits(),
    )
    # A value validation let through, standing for a bug in the models: not a float.
    odd = MeterReading.model_construct(
        meterId="m-odd", kwhConsumedAc="not a number", voltage=230.0, timestamp=datetime.now(UTC)
    )
    batch.readings[Stream.METER].append(odd)
    batch.sources[Stream.METER].append(Msg(1, b'{"meterId": "m-odd"}'))
    batch.offsets[TopicPartition(*tp)] = OffsetRange(0, 2)
    store = await Store.open(database, group_id=settings.group_id, owner="test")
    try:
        claims = await store.claim([tp])
        result = await asyncio.wait_for(store.write(batch, claims), timeout=10)
    finally:
        await store.close()

    assert result.counts[Stream.METER].stored == 1
    (letter,) = result.dead_letters
    assert letter.rejection.reason == "database_rejected"
    assert letter.offset == 1
    assert await db.fetchval("SELECT count(*) FROM meter_history") == 1
    assert await db.fetchval("SELECT reason FROM dead_letters") == "database_rejected"
    assert await db.fetchval("SELECT next_offset FROM consumer_offsets") == 2
