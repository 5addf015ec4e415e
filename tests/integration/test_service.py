"""The service's lifecycle: whatever fails, everything that was started is stopped."""

from __future__ import annotations

import asyncio
import socket

import asyncpg
import pytest

from consumer.errors import ConfigError
from consumer.service import Role, Service
from consumer.settings import Settings
from devtools.factories import meter
from tests.conftest import wait_until
from tests.integration.helpers import offsets_reach, publish_readings


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def service_sessions(db: asyncpg.Connection) -> int:
    """The service's own sessions on this test's database (store and API pools)."""
    return await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name LIKE 'fleet-%'"
    )


async def test_a_pipeline_that_fails_stops_every_part_and_reraises(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """A write the database refuses for a reason no retry can fix (here the batch function
    is gone) ends run() with that error, and the HTTP server, both pools and the Kafka
    clients are closed first: nothing is left listening or connected."""
    await publish_readings(settings.kafka_bootstrap_servers, settings.mixed_topic, [meter("m", 0)])
    service = Service(settings, Role.ALL)
    running = asyncio.create_task(service.run())
    await wait_until(lambda: _connected(db), timeout=30)
    await db.execute("ALTER FUNCTION fleet_write_batch RENAME TO fleet_write_batch_gone")

    await publish_readings(settings.kafka_bootstrap_servers, settings.mixed_topic, [meter("m", 1)])
    with pytest.raises(asyncpg.UndefinedFunctionError):
        await asyncio.wait_for(running, timeout=60)

    assert not listening(settings.http_port)
    await wait_until(lambda: _disconnected(db), timeout=10)
    assert service.consumer is None and service.producer is None


async def test_a_start_that_fails_half_way_stops_what_it_had_started(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """start() fails after the HTTP server and the store are up (a broker that refuses an
    idempotent producer): the error says what to change, and nothing stays open."""
    refused = settings.model_copy(update={"kafka_idempotent_producer": True})
    service = Service(refused, Role.ALL)
    with pytest.raises(ConfigError, match="FLEET_KAFKA_IDEMPOTENT_PRODUCER=false"):
        await asyncio.wait_for(service.run(), timeout=60)
    assert not listening(settings.http_port)
    await wait_until(lambda: _disconnected(db), timeout=10)


async def test_the_api_has_a_pool_of_its_own_that_ingestion_does_not_share(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """In the default role, without FLEET_API_DATABASE_URL, every API connection can be
    busy and the consumer still stores readings: each has its own pool."""
    service = Service(settings.model_copy(update={"api_pool_size": 2}), Role.ALL)
    assert await service.start()
    assert service.pipeline is not None and service.api_pool is not None
    runner = asyncio.create_task(service.pipeline.run())
    held = [await service.api_pool.acquire() for _ in range(2)]  # the API's pool, exhausted
    try:
        await publish_readings(
            settings.kafka_bootstrap_servers, settings.mixed_topic, [meter("m", 0)]
        )
        await wait_until(lambda: offsets_reach(db, settings.mixed_topic, 1), timeout=30)
    finally:
        for conn in held:
            await service.api_pool.release(conn)
        service.pipeline.stop()
        await runner
        await service.stop()


async def _connected(db: asyncpg.Connection) -> bool:
    return await service_sessions(db) > 0


async def _disconnected(db: asyncpg.Connection) -> bool:
    return await service_sessions(db) == 0
