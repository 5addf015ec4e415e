"""Fixtures: a real PostgreSQL and a real Kafka-protocol broker, fresh names per test.

PostgreSQL: FLEET_TEST_ADMIN_DSN (default: the local server on 127.0.0.1:5432),
else an embedded pgserver instance. Broker: FLEET_TEST_BOOTSTRAP_SERVERS when set,
else a tansu process on a free port, logging to .pytest-artifacts/.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pydantic import SecretStr

from consumer.kafka import ensure_topics
from consumer.settings import Settings
from devtools.stack import (
    drop_database,
    free_port,
    fresh_database,
    postgres_reachable,
    start_broker,
    start_embedded_postgres,
)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / ".pytest-artifacts"


@pytest.fixture(scope="session")
def broker() -> Iterator[str]:
    configured = os.environ.get("FLEET_TEST_BOOTSTRAP_SERVERS")
    if configured:
        yield configured
        return
    started = start_broker(ARTIFACTS)
    yield started.bootstrap_servers
    started.stop()


@pytest.fixture(scope="session")
async def admin_dsn() -> str:
    dsn = os.environ.get("FLEET_TEST_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
    if await postgres_reachable(dsn):
        return dsn
    return start_embedded_postgres(ARTIFACTS / "pgdata")


@pytest.fixture
async def database(admin_dsn: str) -> AsyncIterator[str]:
    """A freshly migrated database of this test's own."""
    name = f"fleet_test_{uuid.uuid4().hex[:12]}"
    yield await fresh_database(admin_dsn, name)
    await drop_database(admin_dsn, name)


@pytest.fixture
async def db(database: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database)
    yield conn
    await conn.close()


def make_settings(broker: str, database_url: str, **overrides: Any) -> Settings:
    """Settings for one test: topics and a consumer group of its own, short timeouts,
    and what the local broker needs (no idempotent producer)."""
    suffix = uuid.uuid4().hex[:8]
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": broker,
        "database_url": SecretStr(database_url),
        "meter_topic": f"meter-{suffix}",
        "vehicle_topic": f"vehicle-{suffix}",
        "mixed_topic": f"fleet-{suffix}",
        "dlq_topic": f"dlq-{suffix}",
        "alerts_topic": f"alerts-{suffix}",
        "group_id": f"group-{suffix}",
        "batch_max_records": 500,
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 1000,
        "kafka_idempotent_producer": False,  # tansu does not implement InitProducerId
        "retry_initial_seconds": 0.1,
        "retry_max_seconds": 1.0,
        "http_host": "127.0.0.1",
        "api_auth": "off",  # tests that check authentication set tokens of their own
        "http_port": free_port(),
        "log_json": True,
    }
    return Settings(**(values | overrides))


@pytest.fixture
async def settings(broker: str, database: str) -> Settings:
    """Settings for one test (see make_settings), its topics created with 4 partitions."""
    s = make_settings(broker, database)
    await ensure_topics(broker, [*s.topics, s.dlq_topic, s.alerts_topic], partitions=4)
    return s


async def wait_until(predicate, timeout: float = 60.0, interval: float = 0.2):  # type: ignore[no-untyped-def]
    """Poll an async predicate until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s (last: {value!r})")
        await asyncio.sleep(interval)
