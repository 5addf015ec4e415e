"""History maintenance: retention by whole monthly partitions, the default partition watched,
and a maintenance task that survives its own failures."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import asyncpg
from prometheus_client import REGISTRY

from consumer.maintenance import HistoryMaintenance
from consumer.settings import Settings
from consumer.store import Store
from devtools.factories import meter
from tests.conftest import wait_until
from tests.integration.helpers import offsets_reach, publish_readings, running_service

INSERT = 'INSERT INTO meter_history (meter_id, kwh_consumed_ac, voltage, "timestamp") VALUES ($1, 1, 230, $2)'


async def _exists(db: asyncpg.Connection, table: str) -> bool:
    return bool(await db.fetchval("SELECT to_regclass($1) IS NOT NULL", table))


async def test_a_month_is_dropped_only_once_all_of_it_is_past_the_cutoff(
    db: asyncpg.Connection,
) -> None:
    """Across a month boundary: April goes when the cutoff reaches 1 May 00:00 UTC, not a second earlier."""
    for month in ("2024-04-01", "2024-05-01"):
        await db.execute(
            "SELECT fleet_create_history_partition('meter_history', $1::date)",
            datetime.fromisoformat(month),
        )
    await db.execute(INSERT, "m-1", datetime(2024, 4, 30, 23, 59, tzinfo=UTC))
    await db.execute(INSERT, "m-1", datetime(2024, 5, 1, 0, 0, tzinfo=UTC))

    kept = await db.fetchval(
        "SELECT fleet_drop_history_partitions($1)", datetime(2024, 4, 30, 23, 59, 59, tzinfo=UTC)
    )
    assert kept == []
    dropped = await db.fetchval(
        "SELECT fleet_drop_history_partitions($1)", datetime(2024, 5, 1, tzinfo=UTC)
    )
    assert dropped == ["meter_history_y2024m04"]
    assert await _exists(db, "meter_history_y2024m05")
    assert await db.fetchval("SELECT count(*) FROM meter_history") == 1


async def test_maintenance_applies_retention_and_reports_the_default_partition(
    settings: Settings, database: str, db: asyncpg.Connection
) -> None:
    """With FLEET_HISTORY_RETENTION_DAYS the service drops old months, keeps recent ones and
    the default partition's rows, and exports how many readings sit in the default."""
    now = datetime.now(UTC)
    await db.execute("SELECT fleet_create_history_partition('meter_history', '2023-01-01')")
    await db.execute(INSERT, "old", datetime(2023, 1, 10, tzinfo=UTC))
    await db.execute(INSERT, "outlier", datetime(2001, 1, 1, tzinfo=UTC))  # lands in the default
    await db.execute(INSERT, "recent", now)
    store = await Store.open(database, group_id=settings.group_id, owner="test")
    maintenance = HistoryMaintenance(
        store, settings.model_copy(update={"history_retention_days": 365})
    )
    try:
        before = REGISTRY.get_sample_value("fleet_history_partitions_dropped_total") or 0
        await maintenance.run_once()
    finally:
        await store.close()

    assert not await _exists(db, "meter_history_y2023m01")
    assert await _exists(db, f"meter_history_y{now:%Y}m{now:%m}")
    devices = {r[0] for r in await db.fetch("SELECT meter_id FROM meter_history")}
    assert devices == {"outlier", "recent"}
    assert REGISTRY.get_sample_value("fleet_history_partitions_dropped_total") == before + 1
    assert REGISTRY.get_sample_value("fleet_history_default_rows", {"stream": "meter"}) == 1


async def test_maintenance_that_fails_is_counted_and_retried_while_ingestion_goes_on(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """A maintenance run that fails (here its function is missing) is logged, counted and
    retried at the next interval; it neither stops the service nor ends for good, and once
    the cause is gone the next run succeeds."""
    settings = settings.model_copy(update={"maintenance_interval_seconds": 1})
    errors = REGISTRY.get_sample_value("fleet_maintenance_errors_total") or 0.0
    await db.execute("ALTER FUNCTION fleet_prepare_history_partitions RENAME TO fleet_prepare_gone")
    async with running_service(settings):
        await wait_until(lambda: _counter_at_least("fleet_maintenance_errors_total", errors + 2))
        await publish_readings(
            settings.kafka_bootstrap_servers, settings.mixed_topic, [meter("m-1", 0)]
        )
        await wait_until(lambda: offsets_reach(db, settings.mixed_topic, 1))
        await db.execute(
            "ALTER FUNCTION fleet_prepare_gone RENAME TO fleet_prepare_history_partitions"
        )
        fixed = time.time()
        await wait_until(
            lambda: _counter_at_least("fleet_maintenance_last_success_timestamp_seconds", fixed)
        )


async def _counter_at_least(name: str, value: float) -> bool:
    return (REGISTRY.get_sample_value(name) or 0.0) >= value
