"""Fixtures shared by the integration tests (the service-level ones live in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from consumer.kafka import make_producer
from consumer.settings import Settings


@pytest.fixture
async def producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    """A started producer for the test's broker, as the service would build it."""
    started = make_producer(settings)
    await started.start()
    yield started
    await started.stop()


@pytest.fixture
async def pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    """A small pool on the test's database, as the API and the sessions worker use one."""
    pool = await asyncpg.create_pool(database, min_size=1, max_size=4)
    yield pool
    await pool.close()
