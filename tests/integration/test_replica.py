"""The API on a real streaming standby (pg_basebackup -R of a private primary)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import pytest
from pydantic import SecretStr

from consumer.migrate import migrate
from devtools.processes import ConsumerProcess
from devtools.stack import (
    LocalPostgres,
    start_local_postgres,
    start_standby,
    with_database,
)
from tests.conftest import ARTIFACTS, make_settings, wait_until
from tests.integration.processes import consumer_process
from tests.integration.test_analytics import T0, add_meter, add_vehicle, assign, window
from tests.integration.test_stream import Stream

PATHS = [
    "/v1/vehicles/v-1/live",
    "/v1/meters/m-1/live",
    "/v1/vehicles/v-1/meter",
    "/v1/analytics/performance/v-1",
    "/v1/analytics/fleet/efficiency",
]


@pytest.fixture
def primary() -> Iterator[LocalPostgres]:
    server = start_local_postgres(ARTIFACTS / "replica")
    yield server
    server.stop(mode="immediate")


@pytest.fixture
async def standby(primary: LocalPostgres) -> AsyncIterator[LocalPostgres]:
    dsn = with_database(primary.dsn, "fleet")
    await migrate(dsn)  # creates the database too
    db = await asyncpg.connect(dsn)
    try:
        await add_vehicle(db, "v-1", "0.900")
        await add_meter(db, "m-1", "1.000")
        await assign(db, "v-1", "m-1")
        await db.execute(
            "INSERT INTO vehicle_live (vehicle_id, soc, kwh_delivered_dc, battery_temp, "
            "\"timestamp\") VALUES ('v-1', 50, 0.9, 25, $1)",
            T0,
        )
        await db.execute(
            'INSERT INTO meter_live (meter_id, kwh_consumed_ac, voltage, "timestamp") '
            "VALUES ('m-1', 1, 230, $1)",
            T0,
        )
    finally:
        await db.close()
    server = start_standby(primary, ARTIFACTS / "replica")
    yield server
    server.stop(mode="immediate")


async def get(base: str, path: str, **params: str) -> tuple[int, bytes, dict[str, str]]:
    async with aiohttp.ClientSession() as http, http.get(base + path, params=params) as resp:
        return resp.status, await resp.read(), dict(resp.headers)


async def metric(base: str, name: str) -> float | None:
    _, body, _ = await get(base, "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def test_the_api_on_a_standby_answers_like_the_primary_refuses_writes_and_shows_its_lag(
    broker: str, primary: LocalPostgres, standby: LocalPostgres
) -> None:
    """Two API processes, one on the primary, one on a streaming standby: the same answers,
    byte for byte; a PUT on the standby is 403 read_only; paused replay shows as
    fleet_api_replica_lag_seconds, an older Fleet-Data-As-Of and /readyz 503; the standby
    stopped and started again is served again without restarting the API."""
    primary_dsn = with_database(primary.dsn, "fleet")
    standby_dsn = with_database(standby.dsn, "fleet")
    apis: dict[str, ConsumerProcess] = {}
    for name, dsn in (("primary", primary_dsn), ("standby", standby_dsn)):
        s = make_settings(
            broker, dsn, api_database_url=SecretStr(dsn), api_max_replica_lag_seconds=2
        )
        apis[name] = consumer_process(s, f"api-on-{name}", "--role", "api")
    on_primary = f"http://127.0.0.1:{apis['primary'].http_port}"
    on_standby = f"http://127.0.0.1:{apis['standby'].http_port}"
    check = await asyncpg.connect(standby_dsn)
    writer = await asyncpg.connect(primary_dsn)
    try:
        for base in (on_primary, on_standby):
            await wait_until(lambda b=base: _status(b, "/readyz", 200), timeout=30)
        for path in PATHS:
            params: dict[str, Any] = window() if "analytics" in path else {}
            first, second = (
                await get(on_primary, path, **params),
                await get(on_standby, path, **params),
            )
            assert first[0] == 200, (path, first[1])
            assert first[1] == second[1], path
        async with (
            aiohttp.ClientSession() as http,
            http.put(
                on_standby + "/v1/vehicles/v-2/meter",
                json={"meterId": "m-1", "from": "2026-11-01T00:00:00Z"},
            ) as resp,
        ):
            assert (resp.status, (await resp.json())["error"]["code"]) == (403, "read_only")
        assert await writer.fetchval("SELECT count(*) FROM vehicle_meter_assignments") == 1

        # Replay paused: what the primary writes now reaches the standby but is not applied.
        await check.execute("SELECT pg_wal_replay_pause()")
        written = datetime.now(UTC)
        await writer.execute("UPDATE vehicle_live SET soc = 60 WHERE vehicle_id = 'v-1'")
        await wait_until(lambda: _lag_above(on_standby, 2), timeout=30)
        status, body, _ = await get(on_standby, "/readyz")
        assert status == 503 and b"replica" in body
        _, live, headers = await get(on_standby, "/v1/vehicles/v-1/live")
        assert json.loads(live)["soc"] == 50  # the row as it was before, served as such
        assert datetime.fromisoformat(headers["Fleet-Data-As-Of"]) < written
        _, _, fresh = await get(on_primary, "/v1/vehicles/v-1/live")
        assert datetime.fromisoformat(fresh["Fleet-Data-As-Of"]) >= written.replace(microsecond=0)
        await check.execute("SELECT pg_wal_replay_resume()")
        await wait_until(lambda: _status(on_standby, "/readyz", 200), timeout=30)
        await wait_until(lambda: _lag_is_zero(on_standby), timeout=30)
        await check.close()

        # The standby goes away and comes back: the API follows without a restart.
        standby.stop()
        assert (await get(on_standby, "/v1/vehicles/v-1/live"))[0] == 503
        assert (await get(on_standby, "/readyz"))[0] == 503
        standby.start()
        await wait_until(lambda: _status(on_standby, "/v1/vehicles/v-1/live", 200), timeout=60)
        await wait_until(lambda: _status(on_standby, "/readyz", 200), timeout=30)
    finally:
        await writer.close()
        if not check.is_closed():
            await check.close()
        for api in apis.values():
            api.kill()


async def _status(base: str, path: str, status: int) -> bool:
    try:
        return (await get(base, path))[0] == status
    except aiohttp.ClientError:
        return False


async def _lag_is_zero(base: str) -> bool:
    return await metric(base, "fleet_api_replica_lag_seconds") == 0


async def _lag_above(base: str, seconds: float) -> bool:
    lag = await metric(base, "fleet_api_replica_lag_seconds")
    return lag is not None and lag > seconds


async def test_the_stream_on_a_standby_pushes_what_the_primary_commits_and_nothing_else(
    broker: str, primary: LocalPostgres, standby: LocalPostgres
) -> None:
    """An API on the standby streams a change committed on the primary (it arrives by
    replication like every table); a transaction that rolls back is never streamed."""
    primary_dsn = with_database(primary.dsn, "fleet")
    standby_dsn = with_database(standby.dsn, "fleet")
    s = make_settings(broker, standby_dsn, api_database_url=SecretStr(standby_dsn))
    api = consumer_process(s, "stream-on-standby", "--role", "api")
    base = f"http://127.0.0.1:{api.http_port}"
    writer = await asyncpg.connect(primary_dsn)
    try:
        await wait_until(lambda: _status(base, "/readyz", 200), timeout=30)
        async with aiohttp.ClientSession() as http:
            response = await http.get(base + "/v1/stream?vehicleId=v-1&kinds=live")
            assert response.status == 200
            stream = Stream(response)
            for soc, commits in ((99, False), (70, True)):
                with contextlib.suppress(Rollback):
                    async with writer.transaction():
                        await _write_batch(writer, soc)
                        if not commits:
                            raise Rollback
            await wait_until(lambda: _arrived(stream), timeout=30)
            assert [e["soc"] for e in stream.live("v-1")] == [70]
            await stream.close()
    finally:
        await writer.close()
        api.kill()


class Rollback(Exception):
    """Ends a transaction the way a failed batch does."""


async def _write_batch(db: asyncpg.Connection, soc: int) -> None:
    """What a batch does to v-1, as fleet_write_batch does it: its live row and its mark."""
    await db.execute(
        'UPDATE vehicle_live SET soc = $1, "timestamp" = now(), updated_at = now() '
        "WHERE vehicle_id = 'v-1'",
        soc,
    )
    await db.execute(
        "INSERT INTO batch_marks (meter_ids, meter_ts, vehicle_ids, vehicle_ts, vehicle_temps) "
        "VALUES ('{}', '{}', '{v-1}', ARRAY[now()], '{25}')"
    )


async def _arrived(stream: Stream) -> bool:
    return bool(stream.live("v-1"))
