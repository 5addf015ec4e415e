"""Kafka clients built from Settings, topic provisioning, and the rebalance listener."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from collections.abc import Iterable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context

from consumer.errors import ConfigError
from consumer.partitions import PartitionBook
from consumer.settings import Settings

log = structlog.get_logger(__name__)


def member_name() -> str:
    """Identifies this process in logs, the offsets table and the broker."""
    return f"{socket.gethostname()}-{os.getpid()}"


def security_kwargs(settings: Settings, client: str = "kafka") -> dict[str, Any]:
    """aiokafka's transport arguments from FLEET_KAFKA_*, the same for every client.

    Settings has refused incomplete combinations already; this loads the TLS files
    (a ConfigError when they do not load) and warns, naming `client`, when a password
    would cross the network in clear text or a broker's name goes unchecked.
    """
    protocol = settings.kafka_security_protocol
    kwargs: dict[str, Any] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = _ssl_context(settings)
        if not settings.kafka_ssl_check_hostname:
            log.warning("kafka_hostname_not_verified", client=client, security_protocol=protocol)
    if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        password = settings.kafka_sasl_password
        if password is None or not settings.kafka_sasl_username:  # Settings refuses this
            raise ConfigError(f"{protocol} needs a SASL username and password")
        kwargs |= {
            "sasl_mechanism": settings.kafka_sasl_mechanism,
            "sasl_plain_username": settings.kafka_sasl_username,  # SCRAM's too
            "sasl_plain_password": password.get_secret_value(),
        }
        if protocol == "SASL_PLAINTEXT" and settings.kafka_sasl_mechanism == "PLAIN":
            log.warning(
                "kafka_password_in_clear_text",
                client=client,
                security_protocol=protocol,
                sasl_mechanism="PLAIN",
                advice="use SASL_SSL, or a SCRAM mechanism",
            )
    return kwargs


def _ssl_context(settings: Settings) -> ssl.SSLContext:
    """Verifies the broker's certificate (and, by default, its name) against the CA file."""
    key_password = settings.kafka_ssl_key_password
    try:
        context: ssl.SSLContext = create_ssl_context(
            cafile=settings.kafka_ssl_cafile,  # None: the system's trusted CAs
            certfile=settings.kafka_ssl_certfile,
            keyfile=settings.kafka_ssl_keyfile,
            # Always a callable: an encrypted key without a password fails here
            # instead of OpenSSL prompting on the terminal.
            password=lambda: key_password.get_secret_value() if key_password else "",
        )
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(
            f"the Kafka TLS files (FLEET_KAFKA_SSL_*) do not load: {exc!r}; "
            "expected PEM: a CA bundle, a client certificate and its key"
        ) from exc
    context.check_hostname = settings.kafka_ssl_check_hostname
    return context


def make_consumer(settings: Settings) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        **security_kwargs(settings, "consumer"),
        group_id=settings.group_id,
        client_id=f"fleet-consumer-{member_name()}",
        enable_auto_commit=False,  # offsets are stored in PostgreSQL with the data
        # Positions always come from PostgreSQL; an out-of-range one must surface, not reset.
        auto_offset_reset="none",
        isolation_level="read_committed",
        fetch_max_bytes=settings.fetch_max_bytes,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        max_partition_fetch_bytes=settings.max_partition_fetch_bytes,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        max_poll_interval_ms=settings.max_poll_interval_ms,
    )


def make_producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        **security_kwargs(settings, "producer"),
        client_id=f"fleet-producer-{member_name()}",
        acks="all",
        enable_idempotence=settings.kafka_idempotent_producer,
        linger_ms=5,
    )


async def ensure_topics(
    bootstrap_servers: str,
    topics: Iterable[str],
    partitions: int,
    *,
    settings: Settings | None = None,
) -> None:
    """Create topics that do not exist yet (demo, tests, benchmarks; ops own real clusters).

    The admin client connects as `settings` say (FLEET_KAFKA_SECURITY_*); without: plaintext.
    """
    security = security_kwargs(settings, "admin") if settings is not None else {}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, **security)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [NewTopic(t, partitions, 1) for t in topics if t not in existing]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):  # created concurrently
                await admin.create_topics(wanted)
    finally:
        await admin.close()


class RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Tells the partition book what the group decided. Newly assigned partitions are
    paused until the pipeline has claimed them; revoked ones are simply forgotten (the
    fence makes any batch of theirs still in flight fail to commit, so nothing here needs
    the database)."""

    def __init__(self, consumer: AIOKafkaConsumer, book: PartitionBook) -> None:
        self._consumer = consumer
        self._book = book

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self._book.revoked(revoked)
        log.info(
            "partitions_revoked", partitions=sorted(f"{tp.topic}-{tp.partition}" for tp in revoked)
        )

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        if assigned:
            self._consumer.pause(*assigned)
        self._book.assigned(assigned)
        log.info(
            "partitions_assigned",
            partitions=sorted(f"{tp.topic}-{tp.partition}" for tp in assigned),
        )
