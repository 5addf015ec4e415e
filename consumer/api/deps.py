"""What request handlers need, filled in by the service once its dependencies are up."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from aiohttp import web
from aiokafka import AIOKafkaProducer

from consumer.api.errors import ApiError
from consumer.settings import Settings


@dataclass
class ApiDeps:
    settings: Settings
    pool: asyncpg.Pool | None = None  # reads (and assignment writes); may point at a replica
    producer: AIOKafkaProducer | None = None  # HTTP ingestion

    def require_pool(self) -> asyncpg.Pool:
        if self.pool is None:
            raise ApiError(503, "not_ready", "the database is not connected yet")
        return self.pool

    def require_producer(self) -> AIOKafkaProducer:
        if self.producer is None:
            raise ApiError(503, "broker_unavailable", "the broker is not connected yet")
        return self.producer


DEPS = web.AppKey("deps", ApiDeps)
