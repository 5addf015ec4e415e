"""Least privilege (sql/009): the consumer as fleet_writer, the API as fleet_reader, migrate as
a plain database owner. Each test connects as logins of its own, granted only the group role,
and drops them afterwards (roles are per server, not per database)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from pydantic import SecretStr

from consumer.api.analytics import analytics_routes
from consumer.api.app import make_app
from consumer.api.deps import ApiDeps
from consumer.migrate import SQL_DIR, migrate, migration_files
from consumer.service import Role, Service
from consumer.settings import Settings
from consumer.store import Store
from devtools.factories import meter, vehicle
from devtools.stack import with_database
from tests.conftest import wait_until
from tests.integration.helpers import offsets_reach, publish, publish_readings

MakeLogin = Callable[[str | None], Awaitable[str]]
KEYS = {  # every table the service writes, and a column of it
    "meter_history": "meter_id",
    "vehicle_history": "vehicle_id",
    "meter_live": "meter_id",
    "vehicle_live": "vehicle_id",
    "vehicle_meter_assignments": "vehicle_id",
    "dead_letters": "topic",
    "consumer_offsets": "group_id",
}
DATA_TABLES = tuple(KEYS)
MAINTENANCE = (  # what the consumer calls, run as the owner (SECURITY DEFINER)
    "fleet_prepare_history_partitions",
    "fleet_drop_history_partitions",
    "fleet_history_default_rows",
)
# What sql/009 grants on tables, exactly.
GRANTS = {
    *(
        ("fleet_writer", table, "INSERT")
        for table in ("meter_history", "vehicle_history", "dead_letters")
    ),
    *(
        ("fleet_writer", table, privilege)
        for table in ("meter_live", "vehicle_live", "consumer_offsets")
        for privilege in ("SELECT", "INSERT", "UPDATE")
    ),
    # sql/013: the batch's mark for the sessions worker, appended only
    ("fleet_writer", "batch_marks", "INSERT"),
    ("fleet_writer", "batch_marks_id_seq", "USAGE"),
    *(
        ("fleet_reader", table, "SELECT")
        for table in (
            "meter_history",
            "vehicle_history",
            "meter_live",
            "vehicle_live",
            "vehicle_meter_assignments",
            "charging_sessions",
            "charger_health",
            "alerts",
            "alert_transitions",
            "vehicle_hourly",  # sql/014: the fleet report's totals
            "meter_hourly",
            "fleet_report_version",  # sql/015: when a kept ranking is stale
            "stream_changes",  # sql/016: the live stream's change log
            "stream_horizon",
        )
    ),
}


@pytest.fixture
async def make_login(admin_dsn: str) -> AsyncIterator[MakeLogin]:
    """A factory of uniquely named logins (granted a group role, or none); all dropped at the end."""
    admin = await asyncpg.connect(admin_dsn)
    created: list[str] = []

    async def make(group: str | None) -> str:
        name = f"fleet_lp_{uuid.uuid4().hex[:12]}"
        await admin.execute(f"CREATE ROLE {name} LOGIN" + (f" IN ROLE {group}" if group else ""))
        created.append(name)
        return name

    try:
        yield make
    finally:
        try:
            for name in created:
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                    name,
                )
                await admin.execute(f"DROP ROLE IF EXISTS {name}")
        finally:
            await admin.close()


def as_login(dsn: str, login: str) -> str:
    """The same server and database, another user (trust auth: no password)."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=f"{login}@{parts.netloc.rsplit('@', 1)[-1]}"))


async def refused(conn: asyncpg.Connection, statement: str) -> bool:
    """Whether the statement fails for want of a privilege; rolled back either way.
    Any other error is a mistake in the test and propagates."""
    attempt = conn.transaction()
    await attempt.start()
    try:
        await conn.execute(statement)
    except asyncpg.InsufficientPrivilegeError:
        return True
    finally:
        await attempt.rollback()
    return False


async def snapshot(db: asyncpg.Connection) -> dict[str, list[str]]:
    return {
        table: [r[0] for r in await db.fetch(f"SELECT t::text FROM {table} t ORDER BY 1")]
        for table in DATA_TABLES
    }


async def only_connects(db: asyncpg.Connection, role: str) -> None:
    """Lock the database down as deploy/postgres/init does: only `role` may connect (besides
    the owner and superusers), and nobody gets TEMP."""
    name = await db.fetchval("SELECT current_database()")
    await db.execute(f'REVOKE ALL ON DATABASE "{name}" FROM PUBLIC')
    await db.execute(f'GRANT CONNECT ON DATABASE "{name}" TO {role}')


def month(offset: int, day: int = 1) -> date:
    """A day in the month `offset` months from this one (UTC)."""
    today = datetime.now(UTC).date()
    index = today.year * 12 + today.month - 1 + offset
    return date(index // 12, index % 12 + 1, day)


async def test_consumer_as_a_fleet_writer_login_ingests_upserts_and_dead_letters(
    settings: Settings, database: str, db: asyncpg.Connection, make_login: MakeLogin
) -> None:
    """`run --role ingest` on a login granted only fleet_writer stores readings, keeps the newest
    in live, skips a re-sent reading, dead-letters bad input (one the database refuses, too)
    and drops history past retention at start-up."""
    login = await make_login("fleet_writer")
    await only_connects(db, "fleet_writer")
    await db.execute("SELECT fleet_create_history_partition('meter_history', '2024-01-01')")
    await db.execute(  # a reading only the database refuses: the row-by-row path runs as well
        "ALTER TABLE meter_history ADD CONSTRAINT no_banned CHECK (meter_id <> 'banned')"
    )
    s = settings.model_copy(
        update={"database_url": SecretStr(as_login(database, login)), "history_retention_days": 365}
    )
    bootstrap, topic = s.kafka_bootstrap_servers, s.mixed_topic
    await publish_readings(
        bootstrap,
        topic,
        [meter("m-1", 1, kwhConsumedAc=1.0), vehicle("v-1", 1, soc=40.0), meter("banned", 1)],
    )
    await publish(bootstrap, topic, [(b"x", b"{not json")])

    service = Service(s, Role.INGEST)
    assert await service.start()
    assert service.pipeline is not None
    runner = asyncio.create_task(service.pipeline.run())

    async def consumed(n: int) -> bool:
        if runner.done():
            runner.result()  # the consumer failed: show why now
        return await offsets_reach(db, topic, n)

    try:
        await wait_until(lambda: consumed(4), timeout=30)
        later = [
            vehicle("v-1", 5, soc=60.0),  # newer: live is updated
            meter("m-1", 0, kwhConsumedAc=9.0),  # older: history only, live keeps minute 1
            meter(
                "m-1", 1, kwhConsumedAc=5.0
            ),  # re-sent minute 1: neither history nor live changes
        ]
        await publish_readings(bootstrap, topic, later)
        await wait_until(lambda: consumed(7), timeout=30)
        users = await db.fetch(
            "SELECT DISTINCT usename FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'fleet-consumer%'"
        )
        assert [u[0] for u in users] == [login]
    finally:
        service.pipeline.stop()
        try:
            await runner
        finally:
            await service.stop()

    meters = await db.fetch(
        'SELECT meter_id, kwh_consumed_ac FROM meter_history ORDER BY "timestamp"'
    )
    assert [(r[0], r[1]) for r in meters] == [("m-1", Decimal("9.000")), ("m-1", Decimal("1.000"))]
    live = await db.fetchrow(
        "SELECT kwh_consumed_ac, \"timestamp\" FROM meter_live WHERE meter_id = 'm-1'"
    )
    assert live["kwh_consumed_ac"] == Decimal("1.000")
    assert live["timestamp"].isoformat() == meter("m-1", 1)["timestamp"]
    assert await db.fetchval("SELECT soc FROM vehicle_live WHERE vehicle_id = 'v-1'") == 60
    assert await db.fetchval("SELECT count(*) FROM vehicle_history") == 2
    reasons = await db.fetch("SELECT reason FROM dead_letters ORDER BY 1")
    assert [r[0] for r in reasons] == ["database_rejected", "malformed_json"]
    assert await db.fetchval("SELECT to_regclass('meter_history_y2024m01')") is None


async def test_history_maintenance_runs_as_a_fleet_writer_login(
    database: str, db: asyncpg.Connection, make_login: MakeLogin
) -> None:
    """As fleet_writer, maintenance prepares months back and ahead (moving a reading out of the
    default partition), reports the default's rows and drops a month only once all of it is past
    the cutoff; the partitions it creates belong to the schema's owner, not to the writer."""
    login = await make_login("fleet_writer")
    insert = (
        'INSERT INTO meter_history (meter_id, kwh_consumed_ac, voltage, "timestamp") '
        "VALUES ($1, 1, 230, $2)"
    )
    old = datetime.combine(month(-5, day=10), datetime.min.time(), UTC)
    await db.execute(insert, "m-old", old)  # outside the prepared months: the default partition
    for table in ("meter_history", "vehicle_history"):
        for first in ("2024-04-01", "2024-05-01"):
            await db.execute(
                "SELECT fleet_create_history_partition($1::regclass, $2::date)",
                table,
                date.fromisoformat(first),
            )
    await db.execute(insert, "m-april", datetime(2024, 4, 30, 23, 59, tzinfo=UTC))
    await db.execute(insert, "m-may", datetime(2024, 5, 1, tzinfo=UTC))

    store = await Store.open(as_login(database, login), group_id="g", owner="test")
    try:
        assert await store.default_partition_rows() == (1, 0)
        # Three more months back and two more ahead, for both history tables.
        assert await store.prepare_partitions(6, 5) == 10
        assert await store.default_partition_rows() == (0, 0)
        kept = await store.drop_history_before(datetime(2024, 4, 30, 23, 59, 59, tzinfo=UTC))
        dropped = await store.drop_history_before(datetime(2024, 5, 1, tzinfo=UTC))
    finally:
        await store.close()

    assert kept == []
    assert dropped == ["meter_history_y2024m04", "vehicle_history_y2024m04"]
    devices = await db.fetch(
        "SELECT meter_id, tableoid::regclass::text FROM meter_history ORDER BY 1"
    )
    five_back = month(-5)
    assert [tuple(r) for r in devices] == [
        ("m-may", "meter_history_y2024m05"),
        ("m-old", f"meter_history_y{five_back:%Y}m{five_back:%m}"),
    ]
    owners = await db.fetch(
        "SELECT DISTINCT tableowner FROM pg_tables WHERE tablename LIKE '%history%'"
    )
    assert [r[0] for r in owners] == [await db.fetchval("SELECT current_user")]


WRITER_MUST_NOT = [
    "SELECT count(*) FROM vehicle_history",
    "DELETE FROM meter_history",
    "UPDATE meter_history SET voltage = 0",
    "TRUNCATE vehicle_history",
    'INSERT INTO meter_history_default (meter_id, kwh_consumed_ac, voltage, "timestamp") '
    "VALUES ('m', 1, 230, '2001-01-01Z')",
    "UPDATE dead_letters SET reason = 'edited'",
    "DELETE FROM dead_letters",
    "DELETE FROM meter_live",
    "DELETE FROM consumer_offsets",
    "INSERT INTO vehicle_meter_assignments (vehicle_id, meter_id, valid_from) VALUES ('v', 'm', now())",
    "UPDATE vehicle_meter_assignments SET meter_id = 'm'",
    "DROP TABLE meter_live",
    "ALTER TABLE meter_live ADD COLUMN note text",
    "CREATE TABLE public.lp_probe (x int)",
    "SELECT fleet_create_history_partition('dead_letters', '2024-01-01')",
    "ALTER FUNCTION fleet_drop_history_partitions SECURITY INVOKER",
    "SET ROLE fleet_api",
]


async def test_a_fleet_writer_login_cannot_read_delete_or_change_the_schema(
    database: str, make_login: MakeLogin
) -> None:
    """fleet_writer cannot read or rewrite history, edit dead letters, assign meters, change the
    schema, call partition creation on any table, or become another role."""
    conn = await asyncpg.connect(as_login(database, await make_login("fleet_writer")))
    try:
        allowed = [statement for statement in WRITER_MUST_NOT if not await refused(conn, statement)]
    finally:
        await conn.close()
    assert allowed == []


# Every write on every table, and the tables the API does not serve.
READER_MUST_NOT = [
    *(f"INSERT INTO {table} DEFAULT VALUES" for table in DATA_TABLES),
    *(f"UPDATE {table} SET {key} = {key}" for table, key in KEYS.items()),
    *(f"DELETE FROM {table}" for table in DATA_TABLES),
    "TRUNCATE meter_live",
    "SELECT count(*) FROM dead_letters",
    "SELECT count(*) FROM consumer_offsets",
    "CREATE TABLE public.lp_probe (x int)",
]


async def _http(
    method: str, url: str, *, json: Any = None, params: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, json=json, params=params) as resp,
    ):
        return resp.status, await resp.json()


async def test_api_as_a_fleet_reader_login_serves_reads_and_refuses_writes(
    settings: Settings, database: str, db: asyncpg.Connection, make_login: MakeLogin
) -> None:
    """`run --role api` on a login granted only fleet_reader serves live readings, efficiency and
    assignments; an assignment PUT is a 403 read_only; the login cannot write any table itself,
    nor read the dead letters or offsets; nothing in the database changes."""
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    await db.execute(
        'INSERT INTO vehicle_history (vehicle_id, soc, kwh_delivered_dc, battery_temp, "timestamp") '
        "SELECT 'v-1', 50, 1.0, 25, $1::timestamptz + i * interval '1 minute' FROM generate_series(0, 2) i",
        t0,
    )
    await db.execute(
        'INSERT INTO meter_history (meter_id, kwh_consumed_ac, voltage, "timestamp") '
        "SELECT 'm-1', 1.1, 230, $1::timestamptz + i * interval '1 minute' FROM generate_series(0, 2) i",
        t0,
    )
    await db.execute(
        'INSERT INTO vehicle_live (vehicle_id, soc, kwh_delivered_dc, battery_temp, "timestamp") '
        "VALUES ('v-1', 50, 1.0, 25, $1)",
        t0,
    )
    await db.execute(
        "INSERT INTO vehicle_meter_assignments (vehicle_id, meter_id, valid_from) VALUES ('v-1', 'm-1', $1)",
        t0 - timedelta(days=1),
    )
    await db.execute(  # as the sessions worker would: the totals the fleet report reads
        "SELECT fleet_refresh_hourly('{v-1}', ARRAY[$1::timestamptz], '{m-1}', ARRAY[$1::timestamptz])",
        t0,
    )
    await db.execute(
        'INSERT INTO dead_letters (topic, "partition", "offset", reason, detail) '
        "VALUES ('t', 0, 0, 'malformed_json', 'x')"
    )
    before = await snapshot(db)
    await only_connects(db, "fleet_reader")
    reader = as_login(database, await make_login("fleet_reader"))
    s = settings.model_copy(
        update={"database_url": SecretStr(reader), "api_database_url": SecretStr(reader)}
    )
    service = Service(s, Role.API)
    base = f"http://127.0.0.1:{s.http_port}"
    window = {
        "from": (t0 - timedelta(hours=1)).isoformat(),
        "to": (t0 + timedelta(hours=1)).isoformat(),
    }
    try:
        assert await service.start()
        status, live = await _http("GET", f"{base}/v1/vehicles/v-1/live")
        assert (status, live["soc"]) == (200, 50)
        status, fleet = await _http("GET", f"{base}/v1/analytics/fleet/efficiency", params=window)
        assert status == 200
        assert [(v["vehicleId"], v["efficiencyRatio"], v["status"]) for v in fleet["vehicles"]] == [
            ("v-1", 0.9091, "normal")
        ]
        status, performance = await _http(
            "GET", f"{base}/v1/analytics/performance/v-1", params=window
        )
        assert (status, performance["meterIds"]) == (200, ["m-1"])
        assert (await _http("GET", f"{base}/readyz"))[0] == 200

        later = {"meterId": "m-2", "from": (t0 + timedelta(days=1)).isoformat()}
        for vehicle_id in ("v-1", "v-new"):  # closing the open assignment, or a first one
            status, error = await _http("PUT", f"{base}/v1/vehicles/{vehicle_id}/meter", json=later)
            assert (status, error["error"]["code"]) == (403, "read_only")
            assert "may not write" in error["error"]["message"]
        status, assignments = await _http("GET", f"{base}/v1/vehicles/v-1/meter")
        assert (status, [a["meterId"] for a in assignments["assignments"]]) == (200, ["m-1"])
    finally:
        await service.stop()

    as_reader = await asyncpg.connect(reader)
    try:
        allowed = [
            statement for statement in READER_MUST_NOT if not await refused(as_reader, statement)
        ]
    finally:
        await as_reader.close()
    assert allowed == []
    assert await snapshot(db) == before


async def test_assignment_put_on_a_read_only_replica_is_read_only(
    settings: Settings, db: asyncpg.Connection, database: str
) -> None:
    """A sidecar pointed at a replica (read-only transactions) answers a PUT with 403 read_only."""
    pool = await asyncpg.create_pool(
        database, min_size=1, max_size=2, server_settings={"default_transaction_read_only": "on"}
    )
    app = make_app({}, deps=ApiDeps(settings, pool=pool), routes=analytics_routes())
    try:
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            resp = await client.put(
                "/v1/vehicles/v-1/meter", json={"meterId": "m-1", "from": "2026-01-01T00:00:00Z"}
            )
            assert resp.status == 403
            assert (await resp.json())["error"]["code"] == "read_only"
    finally:
        await pool.close()
    assert await db.fetchval("SELECT count(*) FROM vehicle_meter_assignments") == 0


async def test_a_plain_login_that_owns_the_database_migrates_it_with_exact_grants(
    admin_dsn: str, make_login: MakeLogin
) -> None:
    """migrate as a non-superuser owning the database (the group roles pre-created by an admin)
    applies sql/ once, re-applies 009 harmlessly, grants each role exactly its privileges, and
    the writer's maintenance then runs with that owner's rights."""
    admin = await asyncpg.connect(admin_dsn)
    name = f"fleet_test_owned_{uuid.uuid4().hex[:10]}"
    try:
        for role in ("fleet_writer", "fleet_reader", "fleet_api"):  # the admin's one-off step
            if not await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                # A concurrent migration may create it first.
                with contextlib.suppress(
                    asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError
                ):
                    await admin.execute(f"CREATE ROLE {role} NOLOGIN")
        owner = await make_login(None)
        assert not await admin.fetchval(
            "SELECT rolsuper OR rolcreaterole OR rolcreatedb FROM pg_roles WHERE rolname = $1",
            owner,
        )
        await admin.execute(f'CREATE DATABASE "{name}" OWNER {owner}')
        dsn = as_login(with_database(admin_dsn, name), owner)

        assert await migrate(dsn) == [p.name for p in migration_files()]
        assert await migrate(dsn) == []
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute((SQL_DIR / "009_roles.sql").read_text(encoding="utf-8"))
            grants = await conn.fetch(
                "SELECT r.rolname, c.relname, a.privilege_type "
                "FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a "
                "JOIN pg_roles r ON r.oid = a.grantee "
                "WHERE r.rolname IN ('fleet_writer', 'fleet_reader') "
                "AND c.relnamespace = 'public'::regnamespace"
            )
            assert {tuple(g) for g in grants} == GRANTS
            executable = await conn.fetch(
                "SELECT coalesce(r.rolname, 'PUBLIC'), p.proname FROM pg_proc p "
                "CROSS JOIN LATERAL aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a "
                "LEFT JOIN pg_roles r ON r.oid = a.grantee "
                "WHERE p.pronamespace = 'public'::regnamespace AND a.privilege_type = 'EXECUTE' "
                "AND a.grantee <> p.proowner"
            )
            assert {tuple(e) for e in executable} == {
                ("PUBLIC", "fleet_assignments_do_not_overlap"),  # a trigger's function (sql/005)
                ("PUBLIC", "fleet_efficiency_status"),  # pure arithmetic (sql/011)
                ("PUBLIC", "fleet_watermark"),  # reads as its caller (sql/011)
                ("PUBLIC", "fleet_hour"),  # pure arithmetic (sql/014)
                *(
                    ("fleet_writer", f)
                    for f in (*MAINTENANCE, "fleet_write_batch", "fleet_prune_stream")
                ),
                *(
                    ("fleet_sessions", f)
                    for f in ("fleet_sessionize", "fleet_recount_sessions", "fleet_refresh_hourly")
                ),
            }
            definers = await conn.fetch(
                "SELECT proname, proconfig FROM pg_proc "
                "WHERE pronamespace = 'public'::regnamespace AND prosecdef"
            )
            # sql/015 and sql/016: triggers that record what changed, and the stream's pruning.
            recorders = (
                "fleet_report_changed",
                "fleet_stream_batch",
                "fleet_stream_statement",
                "fleet_prune_stream",
            )
            assert {(d[0], tuple(d[1])) for d in definers} == {
                (f, ("search_path=public, pg_temp",)) for f in (*MAINTENANCE, *recorders)
            }
            public_schema = await conn.fetchval(
                "SELECT array_agg(a.privilege_type) FROM pg_namespace n "
                "CROSS JOIN LATERAL aclexplode(n.nspacl) a "
                "WHERE n.nspname = 'public' AND a.grantee = 0"
            )
            assert public_schema == ["USAGE"]  # no CREATE for everyone

            writer = await make_login("fleet_writer")
            store = await Store.open(as_login(dsn, writer), group_id="g", owner="test")
            try:
                assert await store.prepare_partitions(0, 4) == 2  # month +4 of both tables
            finally:
                await store.close()
            ahead = month(4)
            partition = f"vehicle_history_y{ahead:%Y}m{ahead:%m}"
            assert (
                await conn.fetchval(
                    "SELECT tableowner FROM pg_tables WHERE tablename = $1", partition
                )
                == owner
            )
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
