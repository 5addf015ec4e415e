"""Kafka clients built from Settings, topic provisioning, and the partition tracker."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterable

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from consumer.metrics import CONSUMER_LAG
from consumer.settings import Settings
from consumer.store import Claim

log = structlog.get_logger(__name__)


def member_name() -> str:
    """Identifies this process in logs, the offsets table and the broker."""
    return f"{socket.gethostname()}-{os.getpid()}"


def make_consumer(settings: Settings) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=settings.group_id,
        client_id=f"fleet-consumer-{member_name()}",
        enable_auto_commit=False,  # offsets are stored in PostgreSQL with the data
        # Positions always come from PostgreSQL; an out-of-range one must surface, not reset.
        auto_offset_reset="none",
        isolation_level="read_committed",
        fetch_max_bytes=settings.fetch_max_bytes,
        max_partition_fetch_bytes=settings.max_partition_fetch_bytes,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        max_poll_interval_ms=settings.max_poll_interval_ms,
    )


def make_producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id=f"fleet-producer-{member_name()}",
        acks="all",
        enable_idempotence=settings.kafka_idempotent_producer,
        linger_ms=5,
    )


async def ensure_topics(bootstrap_servers: str, topics: Iterable[str], partitions: int) -> None:
    """Create topics that do not exist yet (demo, tests, benchmarks; ops own real clusters)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [NewTopic(t, partitions, 1) for t in topics if t not in existing]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):  # created concurrently
                await admin.create_topics(wanted)
    finally:
        await admin.close()


class PartitionTracker(ConsumerRebalanceListener):  # type: ignore[misc]
    """Keeps newly assigned partitions paused until the pipeline has claimed them.

    Assigned partitions start paused and pending; the pipeline claims them in
    PostgreSQL (bumping their fence), seeks to the stored offsets and resumes.
    Revoked partitions are simply forgotten: the fence makes any batch of
    theirs still in flight fail to commit, so nothing here needs the database.
    """

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self._consumer = consumer
        self.pending: set[TopicPartition] = set()
        self.claims: dict[tuple[str, int], Claim] = {}

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        for tp in revoked:
            self.pending.discard(tp)
            self.claims.pop((tp.topic, tp.partition), None)
            with contextlib.suppress(KeyError):  # no lag reported yet for it
                CONSUMER_LAG.remove(tp.topic, str(tp.partition))
        log.info(
            "partitions_revoked", partitions=sorted(f"{tp.topic}-{tp.partition}" for tp in revoked)
        )

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        if assigned:
            self._consumer.pause(*assigned)
        for tp in assigned:
            self.claims.pop((tp.topic, tp.partition), None)  # a fence from before is stale
        self.pending |= set(assigned)
        log.info(
            "partitions_assigned",
            partitions=sorted(f"{tp.topic}-{tp.partition}" for tp in assigned),
        )
