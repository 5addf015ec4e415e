"""Migrations and the schema's own guarantees."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from consumer.errors import ConfigError
from consumer.migrate import SQL_DIR, migrate, migration_files
from devtools.stack import with_database
from tests.conftest import ROOT


async def test_migrate_twice_and_concurrently_applies_each_file_once(database: str) -> None:
    """Re-running migrate (even from several processes at once) changes nothing."""
    again = await asyncio.gather(migrate(database), migrate(database), migrate(database))
    assert again == [[], [], []]
    conn = await asyncpg.connect(database)
    try:
        names = [
            r[0] for r in await conn.fetch("SELECT filename FROM schema_migrations ORDER BY 1")
        ]
    finally:
        await conn.close()
    assert names == [p.name for p in migration_files()]


async def test_migrate_without_its_sql_files_is_a_configuration_error(
    database: str, tmp_path: Path
) -> None:
    """An install that lost sql/ must not report success having applied nothing."""
    with pytest.raises(ConfigError, match="no migrations"):
        await migrate(database, tmp_path)


async def test_migrate_creates_a_missing_database(admin_dsn: str) -> None:
    """On a fresh server, `migrate` creates the configured database before applying sql/."""
    dsn = with_database(admin_dsn, "fleet_test_created_by_migrate")
    try:
        applied = await migrate(dsn)
        assert applied == [p.name for p in migration_files()]
    finally:
        admin = await asyncpg.connect(admin_dsn)
        await admin.execute('DROP DATABASE IF EXISTS "fleet_test_created_by_migrate" WITH (FORCE)')
        await admin.close()


async def test_an_applied_file_that_changed_is_refused(database: str, tmp_path: Path) -> None:
    """Landed migrations are never edited: a changed checksum stops migrate with a clear error."""
    sql = tmp_path / "sql"
    shutil.copytree(SQL_DIR, sql)
    first = migration_files(sql)[0]
    first.write_text(first.read_text() + "\n-- edited\n")
    with pytest.raises(ConfigError, match=first.name):
        await migrate(database, sql)


async def test_reading_outside_prepared_months_is_kept_and_moved_when_its_month_is_prepared(
    db: asyncpg.Connection,
) -> None:
    """An old reading lands in the default partition, then in its own month once prepared."""
    await db.execute(
        'INSERT INTO meter_history (meter_id, kwh_consumed_ac, voltage, "timestamp") '
        "VALUES ('m-1', 1, 230, '2019-03-05T10:00:00Z')"
    )
    where = "SELECT tableoid::regclass::text FROM meter_history WHERE meter_id = 'm-1'"
    assert await db.fetchval(where) == "meter_history_default"
    assert await db.fetchval("SELECT fleet_create_history_partition('meter_history', '2019-03-01')")
    assert await db.fetchval(where) == "meter_history_y2019m03"
    assert await db.fetchval("SELECT count(*) FROM meter_history") == 1


async def test_partitions_are_prepared_ahead_of_now(db: asyncpg.Connection) -> None:
    """Next month's partition exists before the month starts."""
    assert await db.fetchval(
        "SELECT to_regclass(format('vehicle_history_y%s', "
        "to_char(now() AT TIME ZONE 'UTC' + interval '1 month', 'YYYY\"m\"MM'))) IS NOT NULL"
    )


@pytest.mark.parametrize(
    ("column", "value"),
    [("soc", 100.01), ("soc", -1), ("battery_temp", 151), ("kwh_delivered_dc", -0.001)],
)
async def test_check_constraints_refuse_out_of_range_values(
    db: asyncpg.Connection, column: str, value: float
) -> None:
    """The database enforces the same ranges as the decoder, whoever writes to it."""
    row = {"soc": 50, "battery_temp": 20, "kwh_delivered_dc": 1} | {column: value}
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(
            'INSERT INTO vehicle_live (vehicle_id, soc, kwh_delivered_dc, battery_temp, "timestamp") '
            "VALUES ('v-1', $1, $2, $3, now())",
            row["soc"],
            row["kwh_delivered_dc"],
            row["battery_temp"],
        )


async def test_a_vehicle_has_one_meter_at_a_time(db: asyncpg.Connection) -> None:
    """Overlapping assignments of one vehicle are refused; back-to-back ones are fine."""
    insert = "INSERT INTO vehicle_meter_assignments VALUES ($1, $2, $3, $4)"
    jan, feb, mid_jan = (datetime(2026, m, d, tzinfo=UTC) for m, d in ((1, 1), (2, 1), (1, 15)))
    await db.execute(insert, "v-1", "m-1", jan, feb)
    await db.execute(insert, "v-1", "m-2", feb, None)
    with pytest.raises(asyncpg.ExclusionViolationError):
        await db.execute(insert, "v-1", "m-3", mid_jan, None)


async def test_a_database_that_applied_an_earlier_landed_001_migrates_and_others_are_refused(
    database: str,
) -> None:
    """001 once landed with other text (its indexes, now 010's): such a database counts as
    migrated; a file changed in any other way after it was applied is still refused."""
    edited = "057cef5573e3e81c37ff40ee7bb2d9e771f9f443f843166f26a787a8203decce"
    conn = await asyncpg.connect(database)
    try:
        update = "UPDATE schema_migrations SET sha256 = $1 WHERE filename = '001_history.sql'"
        await conn.execute(update, edited)
        assert await migrate(database) == []
        await conn.execute(update, "0" * 64)
        with pytest.raises(ConfigError, match="changed after it was applied"):
            await migrate(database)
    finally:
        await conn.close()


def test_the_migrations_ship_in_the_package_and_the_dev_tooling_does_not(tmp_path: Path) -> None:
    """`pip install` of the project carries consumer/sql/ (so `migrate` works wherever the
    package is installed, whatever the working directory) and none of devtools/ or scripts/."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(
        n.removeprefix("consumer/sql/") for n in names if n.startswith("consumer/sql/")
    )
    assert shipped == [p.name for p in migration_files()]
    assert not [n for n in names if n.startswith(("devtools/", "scripts/", "tests/"))]
