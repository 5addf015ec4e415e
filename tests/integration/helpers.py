"""What integration tests share: publishing, running the service in-process, table reads.
(Readings themselves come from devtools.factories.)"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer

from consumer.service import Service
from consumer.settings import Settings
from devtools.factories import encode


async def publish(
    bootstrap: str, topic: str, messages: Iterable[tuple[bytes | None, bytes | None]]
) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, key=k, value=v) for k, v in messages]
        for f in futures:
            await f
        return len(futures)
    finally:
        await producer.stop()


async def publish_readings(bootstrap: str, topic: str, readings: Sequence[dict[str, Any]]) -> int:
    return await publish(bootstrap, topic, (encode(r) for r in readings))


async def publish_to_partition(
    bootstrap: str, topic: str, partition: int, readings: Sequence[dict[str, Any]]
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        sent = [
            await producer.send(topic, key=key, value=value, partition=partition)
            for key, value in (encode(r) for r in readings)
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def consume_until_idle(settings: Settings, idle_timeout: float = 2.0) -> None:
    """Run the real service loop in-process until no record arrived for idle_timeout seconds."""
    await Service(settings).run(idle_timeout=idle_timeout)


@contextlib.asynccontextmanager
async def running_service(settings: Settings) -> AsyncIterator[Service]:
    """The real service loop in-process, for tests that publish while it consumes."""
    service = Service(settings)
    assert await service.start()
    assert service.pipeline is not None
    runner = asyncio.create_task(service.pipeline.run())
    try:
        yield service
    finally:
        service.pipeline.stop()
        await runner
        await service.stop()


async def offsets_reach(db: asyncpg.Connection, topic: str, n: int) -> bool:
    """Whether the offsets stored for topic add up to at least n (n messages consumed)."""
    return await stored_offsets(db, topic) >= n


async def stored_offsets(db: asyncpg.Connection, topic: str) -> int:
    return int(
        await db.fetchval(
            "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets WHERE topic = $1", topic
        )
    )


def as_key(device: str, ts: datetime) -> tuple[str, str]:
    return device, ts.astimezone(UTC).isoformat()


async def history_keys(db: asyncpg.Connection, table: str, id_col: str) -> list[tuple[str, str]]:
    rows = await db.fetch(f'SELECT {id_col}, "timestamp" FROM {table}')
    return [as_key(r[0], r[1]) for r in rows]


def newest_by_device(
    readings: Iterable[dict[str, Any]], id_field: str
) -> dict[str, dict[str, Any]]:
    newest: dict[str, dict[str, Any]] = {}
    for r in readings:
        if id_field not in r:
            continue
        held = newest.get(r[id_field])
        if held is None or datetime.fromisoformat(r["timestamp"]) > datetime.fromisoformat(
            held["timestamp"]
        ):
            newest[r[id_field]] = r
    return newest


def dec(value: float) -> Decimal:
    return Decimal(str(value)).quantize(Decimal("0.001"))
