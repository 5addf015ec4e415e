"""One process, three roles: all, the consumer alone (ingest), the HTTP API alone (api)."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
from pydantic import SecretStr

from consumer.service import Role, Service
from consumer.settings import Settings
from devtools.factories import meter
from tests.conftest import wait_until
from tests.integration.helpers import offsets_reach
from tests.integration.processes import TcpProxy


async def _get(base: str, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(base + path) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_api_role_serves_the_api_without_joining_the_consumer_group(
    settings: Settings,
) -> None:
    """`run --role api` answers API requests and consumes nothing."""
    service = Service(settings, Role.API)
    try:
        assert await service.start()
        base = f"http://127.0.0.1:{settings.http_port}"
        assert service.consumer is None
        status, document = await _get(base, "/openapi.json")
        assert status == 200
        assert document["openapi"].startswith("3.1")
        status, body = await _get(base, "/v1/vehicles/ev-1/live")
        assert (status, body["error"]["code"]) == (404, "vehicle_not_found")
    finally:
        await service.stop()


async def test_ingest_role_consumes_and_serves_only_health_and_metrics(
    settings: Settings,
) -> None:
    """`run --role ingest` runs the consumer and has no /v1 routes."""
    service = Service(settings, Role.INGEST)
    try:
        assert await service.start()
        assert service.pipeline is not None
        base = f"http://127.0.0.1:{settings.http_port}"
        status, body = await _get(base, "/v1/vehicles/ev-1/live")
        assert (status, body["error"]["code"]) == (404, "not_found")
        assert (await _get(base, "/healthz"))[0] == 200
    finally:
        await service.stop()


async def test_a_reading_posted_to_the_api_is_consumed_into_history(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """In the default role a reading POSTed to the API comes back through the consumer."""
    service = Service(settings)
    assert await service.start()
    assert service.pipeline is not None
    runner = asyncio.create_task(service.pipeline.run())
    try:
        url = f"http://127.0.0.1:{settings.http_port}/v1/ingestion/telemetry"
        async with aiohttp.ClientSession() as http, http.post(url, json=meter("m-http", 0)) as resp:
            assert (resp.status, (await resp.json())["accepted"]) == (202, 1)
        await wait_until(lambda: offsets_reach(db, settings.meter_topic, 1))
    finally:
        service.pipeline.stop()
        await runner
        await service.stop()
    assert await db.fetchval("SELECT count(*) FROM meter_history WHERE meter_id = 'm-http'") == 1


async def test_api_connected_as_the_fleet_api_role_reads_and_assigns_but_cannot_write_data(
    settings: Settings, database: str, db: asyncpg.Connection
) -> None:
    """With FLEET_API_DATABASE_URL as a login granted fleet_api (sql/007), the API works and
    that login cannot touch the ingested data."""
    login = f"api_{settings.group_id.replace('-', '_')}"
    await db.execute(f"CREATE ROLE {login} LOGIN IN ROLE fleet_api")
    parts = urlsplit(database)
    api_dsn = urlunsplit(parts._replace(netloc=f"{login}@{parts.netloc.split('@')[-1]}"))
    service = Service(
        settings.model_copy(update={"api_database_url": SecretStr(api_dsn)}), Role.API
    )
    try:
        assert await service.start()
        base = f"http://127.0.0.1:{settings.http_port}"
        body = {"meterId": "m-1", "from": "2026-11-01T00:00:00Z"}
        async with (
            aiohttp.ClientSession() as http,
            http.put(f"{base}/v1/vehicles/ev-1/meter", json=body) as resp,
        ):
            assert resp.status == 201
        assert (await _get(base, "/v1/vehicles/ev-1/meter"))[0] == 200
        as_api = await asyncpg.connect(api_dsn)
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await as_api.execute("DELETE FROM meter_history")
        finally:
            await as_api.close()
    finally:
        await service.stop()
        await db.execute(f"DROP ROLE {login}")


async def test_the_api_answers_503_with_retry_after_while_its_database_is_away(
    settings: Settings,
) -> None:
    """A database restart or outage is a 503 database_unavailable with Retry-After, never a
    500; the API answers normally once it is back."""
    proxy = TcpProxy(settings.database_url.get_secret_value())
    await proxy.start()
    via_proxy = SecretStr(proxy.dsn)
    service = Service(settings.model_copy(update={"api_database_url": via_proxy}), Role.API)
    base = f"http://127.0.0.1:{settings.http_port}"
    try:
        assert await service.start()
        assert (await _get(base, "/v1/vehicles/ev-1/live"))[0] == 404  # connected: not found
        await proxy.cut()
        async with (
            aiohttp.ClientSession() as http,
            http.get(base + "/v1/vehicles/ev-1/live") as resp,
        ):
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "5"
            assert (await resp.json())["error"]["code"] == "database_unavailable"
        async with aiohttp.ClientSession() as http, http.get(base + "/metrics") as resp:
            counted = 'route="/v1/vehicles/{vehicleId}/live",status="503"'
            assert counted in await resp.text()  # the metric says what the client got
        await proxy.start()
        await wait_until(lambda: _status_is(base, "/v1/vehicles/ev-1/live", 404), timeout=30)
    finally:
        await service.stop()
        await proxy.cut()


async def _status_is(base: str, path: str, status: int) -> bool:
    return (await _get(base, path))[0] == status


async def test_readiness_in_the_api_role_follows_the_apis_own_database(
    settings: Settings,
) -> None:
    """`--role api` with FLEET_API_DATABASE_URL (a replica): /readyz says not ready while that
    database is away, although FLEET_DATABASE_URL's is up, and ready again once it is back."""
    proxy = TcpProxy(settings.database_url.get_secret_value())
    await proxy.start()
    service = Service(
        settings.model_copy(update={"api_database_url": SecretStr(proxy.dsn)}), Role.API
    )
    base = f"http://127.0.0.1:{settings.http_port}"
    try:
        assert await service.start()
        assert await _get(base, "/readyz") == (
            200,
            {"status": "ready", "checks": {"database": "ok", "broker": "ok"}},
        )
        await proxy.cut()
        status, body = await _get(base, "/readyz")
        assert (status, body["checks"]["database"][:11]) == (503, "unavailable")
        await proxy.start()
        await wait_until(lambda: _status_is(base, "/readyz", 200), timeout=30)
    finally:
        await service.stop()
        await proxy.cut()


async def test_the_api_never_falls_back_to_another_database_and_ingests_without_one(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """`--role api` whose FLEET_API_DATABASE_URL (a replica) is unreachable at start, while
    FLEET_DATABASE_URL (the primary) is up: reads and writes answer 503 and the primary is
    left alone; HTTP ingestion, which needs only the broker, is accepted meanwhile."""
    proxy = TcpProxy(settings.database_url.get_secret_value())  # not started: unreachable
    service = Service(
        settings.model_copy(update={"api_database_url": SecretStr(proxy.dsn)}), Role.API
    )
    base = f"http://127.0.0.1:{settings.http_port}"
    try:
        assert await service.start()
        assert (await _get(base, "/v1/vehicles/ev-1/live"))[0] == 503
        body = {"meterId": "m-1", "from": "2026-11-01T00:00:00Z"}
        async with (
            aiohttp.ClientSession() as http,
            http.put(f"{base}/v1/vehicles/ev-1/meter", json=body) as put,
            http.post(f"{base}/v1/ingestion/telemetry", json=meter("m-http", 0)) as post,
        ):
            assert put.status == 503
            assert post.status == 202
    finally:
        await service.stop()
    assert await db.fetchval("SELECT count(*) FROM vehicle_meter_assignments") == 0
