"""The running service: start in order, stop in reverse, both idempotent."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import signal
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import asyncpg
import structlog
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError, UnknownError

from consumer import metrics
from consumer.api.app import make_app
from consumer.api.deps import ApiDeps
from consumer.api.routes import api_routes
from consumer.api.security import security_middlewares
from consumer.errors import ConfigError, is_misconfiguration, is_transient, misconfigured
from consumer.kafka import PartitionTracker, make_consumer, make_producer, member_name
from consumer.pipeline import Pipeline
from consumer.settings import Settings
from consumer.store import Store

log = structlog.get_logger(__name__)
T = TypeVar("T")

_PARTITION_MAINTENANCE_INTERVAL_S = 3600.0


async def _until_up(
    what: str, connect: Callable[[], Awaitable[T]], stop: asyncio.Event
) -> T | None:
    """Start-up waits for its dependencies instead of crash-looping; None once asked to stop."""
    delay = 0.5
    while True:
        try:
            return await connect()
        except KafkaConnectionError as exc:
            error = repr(exc)
        except Exception as exc:
            if is_misconfiguration(exc):  # e.g. TLS that does not verify: waiting cannot help
                raise misconfigured(what, exc) from exc
            if not is_transient(exc):
                raise
            error = repr(exc)
        log.warning("dependency_unavailable", dependency=what, error=error, retry_in_seconds=delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay * random.uniform(0.5, 1.0))  # noqa: S311
        if stop.is_set():
            return None
        delay = min(delay * 2, 10.0)


class Role(enum.StrEnum):
    """What one process serves: `all` for small deployments; scale `ingest` with partitions
    and `api` with read replicas."""

    ALL = "all"
    INGEST = "ingest"  # the consumer group, with health and metrics only
    API = "api"  # the HTTP API (analytics, assignments, ingestion), no consumer group


class Service:
    def __init__(self, settings: Settings, role: Role = Role.ALL) -> None:
        self.settings = settings
        self.role = role
        self.consumes = role in (Role.ALL, Role.INGEST)
        self.serves_api = role in (Role.ALL, Role.API)
        self.deps = ApiDeps(settings)
        self.stopping = asyncio.Event()
        self.store: Store | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.pipeline: Pipeline | None = None
        self.http: web.AppRunner | None = None
        self.api_pool: asyncpg.Pool | None = None
        self._maintenance: asyncio.Task[None] | None = None

    async def start(self) -> bool:
        """Start everything; False when asked to stop before the dependencies came up."""
        s = self.settings
        api = self.serves_api
        self.http = web.AppRunner(
            make_app(
                {"database": self._check_database, "broker": self._check_broker},
                before_scrape=self._report_pool,
                deps=self.deps,
                routes=api_routes() if api else [],
                middlewares=security_middlewares(s) if api else [],
            )
        )
        await self.http.setup()
        await web.TCPSite(self.http, s.http_host, s.http_port).start()
        log.info("http_listening", host=s.http_host, port=s.http_port)

        self.store = await _until_up(
            "database",
            lambda: Store.open(
                s.database_url.get_secret_value(),
                group_id=s.group_id,
                owner=member_name(),
                idle_in_transaction_timeout_ms=s.db_idle_in_transaction_timeout_ms,
                max_size=s.write_lanes + 2,  # lanes, claims, readiness probe
            ),
            self.stopping,
        )
        if self.store is None:
            return False
        metrics.SINK_AVAILABLE.set(1)  # connected; the pipeline sets 0 while it waits for it
        self.deps.pool = self.store.pool
        if self.serves_api and s.api_database_url is not None:
            api_dsn = s.api_database_url.get_secret_value()
            self.api_pool = await _until_up(
                "api database",
                lambda: asyncpg.create_pool(api_dsn, min_size=1, max_size=8),
                self.stopping,
            )
            if self.api_pool is None:
                return False
            self.deps.pool = self.api_pool
        if self.consumes:  # the api role may point at a read-only replica
            await self.maintain_history()
            self._maintenance = asyncio.create_task(self._maintain_history_hourly())

        self.producer = make_producer(s)  # dead letters, and HTTP ingestion
        await _until_up("broker", self._start_producer, self.stopping)
        if self.stopping.is_set():
            return False
        self.deps.producer = self.producer
        if not self.consumes:
            log.info("api_started", role=self.role.value)
            return True
        self.consumer = make_consumer(s)
        tracker = PartitionTracker(self.consumer)
        self.consumer.subscribe(list(s.topics), listener=tracker)
        await _until_up("broker", self.consumer.start, self.stopping)
        if self.stopping.is_set():
            return False
        self.pipeline = Pipeline(s, self.store, self.consumer, tracker, self.producer)
        log.info("consumer_started", group=s.group_id, topics=list(s.topics), member=member_name())
        return True

    async def run(self, max_batches: int | None = None, idle_timeout: float | None = None) -> None:
        if await self.start() and self.pipeline is None:
            await self.stopping.wait()  # the api role: serve until SIGTERM
        elif self.pipeline is not None:
            runner = asyncio.create_task(self.pipeline.run(max_batches, idle_timeout))
            stopper = asyncio.create_task(self.stopping.wait())
            await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
            self.pipeline.stop()  # finish the batch in hand
            try:
                await asyncio.wait_for(runner, timeout=30)
            except TimeoutError:
                log.warning("shutdown_timed_out", waited_seconds=30)
            stopper.cancel()
        await self.stop()

    async def _start_producer(self) -> None:
        assert self.producer is not None  # noqa: S101 -- set just before
        try:
            await self.producer.start()
        except UnknownError as exc:
            await self.producer.stop()
            if self.settings.kafka_idempotent_producer:
                raise ConfigError(
                    "the broker refused an idempotent producer (InitProducerId); for brokers "
                    "without it set FLEET_KAFKA_IDEMPOTENT_PRODUCER=false"
                ) from exc
            raise

    async def stop(self) -> None:
        """Reverse order of start(); safe to call twice."""
        if self._maintenance is not None:
            self._maintenance.cancel()
            self._maintenance = None
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None
        if self.api_pool is not None:
            await self.api_pool.close()
            self.api_pool = None
        if self.store is not None:
            await self.store.close()
            self.store = None
        if self.http is not None:
            await self.http.cleanup()
            self.http = None
        self.deps.pool = self.deps.producer = None
        log.info("stopped")

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("stop_requested", signal=sig.name)
        self.stopping.set()

    async def maintain_history(self) -> None:
        """Prepare monthly partitions ahead, drop those past retention, watch the default."""
        assert self.store is not None  # noqa: S101 -- called once the store is open
        s = self.settings
        months_back = s.partitions_months_back
        if s.history_retention_days is not None:  # do not re-create what retention drops
            months_back = min(months_back, s.history_retention_days // 31)
        created = await self.store.prepare_partitions(months_back, s.partitions_months_ahead)
        if created:
            log.info("history_partitions_prepared", created=created)
        if s.history_retention_days is not None:
            cutoff = datetime.now(UTC) - timedelta(days=s.history_retention_days)
            dropped = await self.store.drop_history_before(cutoff)
            if dropped:
                metrics.HISTORY_PARTITIONS_DROPPED.inc(len(dropped))
                log.info(
                    "history_partitions_dropped", partitions=dropped, before=cutoff.isoformat()
                )
        meters, vehicles = await self.store.default_partition_rows()
        metrics.HISTORY_DEFAULT_ROWS.labels("meter").set(meters)
        metrics.HISTORY_DEFAULT_ROWS.labels("vehicle").set(vehicles)

    async def _maintain_history_hourly(self) -> None:
        while True:
            await asyncio.sleep(_PARTITION_MAINTENANCE_INTERVAL_S)
            try:
                await self.maintain_history()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("history_maintenance_deferred", error=repr(exc))

    async def _check_database(self) -> None:
        if self.store is None:
            raise ConnectionError("not connected")
        await self.store.ping()

    async def _check_broker(self) -> None:
        if self.producer is None:
            raise ConnectionError("not connected")
        try:
            await self.producer.client.fetch_all_metadata()
        except KafkaError as exc:
            raise ConnectionError(str(exc)) from exc

    def _report_pool(self) -> None:
        pools = {"store": self.store.pool if self.store else None, "api": self.api_pool}
        for name, pool in pools.items():
            if pool is None:
                continue
            gauge = metrics.DB_POOL_CONNECTIONS
            gauge.labels(name, "max").set(pool.get_max_size())
            gauge.labels(name, "idle").set(pool.get_idle_size())
            gauge.labels(name, "in_use").set(pool.get_size() - pool.get_idle_size())
