"""The running service: the parts a role needs, started in order, stopped in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import signal
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import structlog
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError, UnknownError

from consumer import metrics
from consumer.alerts import AlertPublisher
from consumer.api.app import make_app, make_metrics_app
from consumer.api.deps import API_SERVER_SETTINGS, ApiDeps
from consumer.api.replica import ReplicaLag, as_of_header
from consumer.api.routes import api_routes
from consumer.api.security import configured_tokens, security_middlewares
from consumer.api.server import ConnectionLimits, HardenedRunner
from consumer.backoff import Backoff
from consumer.errors import ConfigError, is_misconfiguration, is_transient, misconfigured
from consumer.kafka import RebalanceListener, make_consumer, make_producer, member_name
from consumer.maintenance import HistoryMaintenance
from consumer.partitions import PartitionBook
from consumer.pipeline import Pipeline
from consumer.sessions import SessionWorker
from consumer.settings import Settings
from consumer.store import Store
from consumer.stream_pruning import prune_stream_forever

log = structlog.get_logger(__name__)
T = TypeVar("T")

# How long start() waits for a dependency the API can serve without (it keeps connecting
# in the background): long enough that a normal start is fully connected when it returns.
_FIRST_CONNECT_S = 5.0
_SHUTDOWN_WAIT_S = 30.0


async def _until_up(
    what: str, connect: Callable[[], Awaitable[T]], stop: asyncio.Event
) -> T | None:
    """Start-up waits for its dependencies instead of crash-looping; None once asked to stop."""
    backoff = Backoff(0.5, 10.0)
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
        log.warning(
            "dependency_unavailable",
            dependency=what,
            error=error,
            retry_in_seconds=round(backoff.ceiling, 2),
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), backoff.next_wait())
        if stop.is_set():
            return None


class Role(enum.StrEnum):
    """What one process serves: `all` for small deployments; scale `ingest` with partitions
    and `api` with read replicas."""

    ALL = "all"
    INGEST = "ingest"  # the consumer group, with health and metrics only
    API = "api"  # the HTTP API (analytics, assignments, ingestion), no consumer group
    SESSIONS = "sessions"  # charging sessions and alerts from history, and the alerts' outbox


class Service:
    """One process of the platform, in the role it was given.

    start() brings the parts up in order: the HTTP server first (health answers at
    once); for the consuming roles the store's pool, history maintenance, the producer
    and the consumer group; for the API its own pool (FLEET_API_DATABASE_URL, else
    FLEET_DATABASE_URL; never the store's, never a fallback) and the producer, which
    connect independently in the background once start() has waited a moment, so
    analytics need only the database and HTTP ingestion only the broker.

    Every part, once started, is registered on one AsyncExitStack: stop(), or an error
    anywhere in start() or run(), stops exactly what was started, in reverse order.
    run() drives the pipeline (or, in the api role, serves) until SIGTERM or SIGINT, or
    until a bounded run ends; a pipeline that fails stops the whole service and its
    error is re-raised.
    """

    def __init__(self, settings: Settings, role: Role = Role.ALL) -> None:
        self.settings = settings
        self.role = role
        self.consumes = role in (Role.ALL, Role.INGEST)
        self.serves_api = role in (Role.ALL, Role.API)
        self.sessionizes = role in (Role.ALL, Role.SESSIONS)
        self.sessions_pool: asyncpg.Pool | None = None
        self.deps = ApiDeps(settings)
        self.stopping = asyncio.Event()
        self.store: Store | None = None
        self.api_pool: asyncpg.Pool | None = None
        self.producer: AIOKafkaProducer | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.pipeline: Pipeline | None = None
        self.listener: RebalanceListener | None = None
        self.replica_lag = ReplicaLag(self.deps)
        self._stack: contextlib.AsyncExitStack | None = None
        self._failed: BaseException | None = None  # what a background connection hit

    async def start(self) -> bool:
        """Start everything; False when asked to stop before the dependencies came up.
        Whatever start() raises, what it had started is stopped again."""
        self._stack = contextlib.AsyncExitStack()
        try:
            return await self._start(self._stack)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, stack: contextlib.AsyncExitStack) -> bool:
        s = self.settings
        await self._serve_http(stack)
        # The broker and the API's database connect on their own: HTTP ingestion needs only
        # the first, analytics only the second, and neither waits for the store.
        producer = await self._connect_in_background(
            stack, "broker", lambda: self._start_producer(stack)
        )
        if self.serves_api:
            await self._connect_in_background(stack, "api database", self._open_api_pool)
            lag = asyncio.create_task(self.replica_lag.watch())
            stack.push_async_callback(_cancelled, lag)
        if self.sessionizes:
            pool = await self._connect_in_background(
                stack, "sessions database", self._open_sessions_pool
            )
            worker = asyncio.create_task(self._run_sessions(pool, producer))
            stack.push_async_callback(_cancelled, worker)
        if not self.consumes:
            log.info("started", role=self.role.value)
            return True

        self.store = await _until_up(
            "database",
            lambda: Store.open(
                s.database_url.get_secret_value(),
                group_id=s.group_id,
                owner=member_name(),
                idle_in_transaction_timeout_ms=s.db_idle_in_transaction_timeout_ms,
                command_timeout=s.db_command_timeout_seconds,
                max_size=s.write_lanes + 2,  # lanes, claims, maintenance and readiness
            ),
            self.stopping,
        )
        if self.store is None:
            return False
        stack.push_async_callback(self.store.close)
        metrics.SINK_AVAILABLE.set(1)  # connected; the pipeline sets 0 while it waits for it
        maintenance = asyncio.create_task(HistoryMaintenance(self.store, s).supervise())
        stack.push_async_callback(_cancelled, maintenance)
        pruning = asyncio.create_task(prune_stream_forever(self.store, s))
        stack.push_async_callback(_cancelled, pruning)

        stopper = asyncio.create_task(self.stopping.wait())
        await asyncio.wait({producer, stopper}, return_when=asyncio.FIRST_COMPLETED)
        await _cancelled(stopper)
        if self.producer is None:
            return False  # stopping (a failed connection stops the service too)
        self.consumer = make_consumer(s)
        book = PartitionBook()
        self.listener = RebalanceListener(self.consumer, book)
        self.consumer.subscribe(list(s.topics), listener=self.listener)
        if await _until_up("broker", self._start_consumer(stack), self.stopping) is None:
            return False
        self.pipeline = Pipeline(s, self.store, self.consumer, book, self.producer)
        log.info("consumer_started", group=s.group_id, topics=list(s.topics), member=member_name())
        return True

    async def run(self, max_batches: int | None = None, idle_timeout: float | None = None) -> None:
        """Start, consume (or serve) until asked to stop, then stop; re-raises a failure."""
        try:
            if await self.start():
                await self._serve(max_batches, idle_timeout)
        finally:
            await self.stop()
        if self._failed is not None:
            raise self._failed

    async def _serve(self, max_batches: int | None, idle_timeout: float | None) -> None:
        stopper = asyncio.create_task(self.stopping.wait())
        if self.pipeline is None:
            await stopper  # the api role: serve until SIGTERM
            return
        runner = asyncio.create_task(self.pipeline.run(max_batches, idle_timeout))
        await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        await _cancelled(stopper)
        self.pipeline.stop()  # finish the batches in hand
        done, _ = await asyncio.wait({runner}, timeout=_SHUTDOWN_WAIT_S)
        if not done:
            log.warning("shutdown_timed_out", waited_seconds=_SHUTDOWN_WAIT_S)
            await _cancelled(runner)
        else:
            runner.result()  # re-raise what stopped the pipeline

    async def stop(self) -> None:
        """Stop what was started, in reverse order; safe to call twice."""
        stack, self._stack = self._stack, None
        if stack is None:
            return
        await stack.aclose()
        self.deps.pool = self.deps.producer = None
        self.store = self.api_pool = self.sessions_pool = self.producer = self.consumer = None
        log.info("stopped")

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("stop_requested", signal=sig.name)
        self.stopping.set()

    # --- the parts ---------------------------------------------------------------------

    async def _serve_http(self, stack: contextlib.AsyncExitStack) -> None:
        s = self.settings
        checks = {}
        if self.consumes:
            checks["database"] = self._check_store
        if self.sessionizes:
            checks["sessions_database"] = self._check_sessions_database
        if self.serves_api:
            checks["api_database" if self.consumes else "database"] = self._check_api_database
            self._warn_about_auth()
        checks["broker"] = self._check_broker
        app = make_app(
            checks,
            before_scrape=self._report_pools,
            deps=self.deps,
            routes=api_routes() if self.serves_api else [],
            middlewares=security_middlewares(s) if self.serves_api else [],
            serve_metrics=s.metrics_port is None,
        )
        if self.serves_api:
            app.on_response_prepare.append(as_of_header)
        sites = [(app, s.http_port)]
        if s.metrics_port is not None:
            sites.append((make_metrics_app(self._report_pools), s.metrics_port))
        for served, port in sites:
            runner = HardenedRunner(served, ConnectionLimits.from_settings(s))
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            await web.TCPSite(runner, s.http_host, port).start()
            log.info("http_listening", host=s.http_host, port=port)

    def _warn_about_auth(self) -> None:
        s = self.settings
        if configured_tokens(s):  # also refuses malformed scopes: a ConfigError
            return
        if s.api_auth == "off":
            log.warning("api_auth_off", advice="anyone who reaches this port may use /v1")
        else:
            log.error(
                "api_auth_not_configured",
                action="/v1 answers 503 auth_not_configured",
                advice="set FLEET_API_TOKENS, or FLEET_API_AUTH=off on purpose",
            )

    async def _open_api_pool(self) -> asyncpg.Pool:
        s = self.settings
        dsn = (s.api_database_url or s.database_url).get_secret_value()
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=s.api_pool_size,
            timeout=s.db_command_timeout_seconds,
            command_timeout=s.db_command_timeout_seconds,
            server_settings={
                **API_SERVER_SETTINGS,
                "application_name": f"fleet-api {member_name()}"[:63],
                # The server ends a query past this (503 query_timeout): a heavy report
                # cannot hold a connection, or a replica's replay, for long.
                "statement_timeout": str(s.api_statement_timeout_ms),
            },
        )
        assert self._stack is not None  # noqa: S101 -- set while starting
        self._stack.push_async_callback(_close_pool, pool)
        self.api_pool = self.deps.pool = pool
        return pool

    async def _start_producer(self, stack: contextlib.AsyncExitStack) -> AIOKafkaProducer:
        """The producer for dead letters and HTTP ingestion; one that fails to start is closed."""
        producer = make_producer(self.settings)
        try:
            await producer.start()
        except UnknownError as exc:
            await producer.stop()
            if self.settings.kafka_idempotent_producer:
                raise ConfigError(
                    "the broker refused an idempotent producer (InitProducerId); for brokers "
                    "without it set FLEET_KAFKA_IDEMPOTENT_PRODUCER=false"
                ) from exc
            raise
        except BaseException:
            await producer.stop()  # a failed start leaves its client open
            raise
        stack.push_async_callback(producer.stop)
        self.producer = self.deps.producer = producer
        return producer

    async def _open_sessions_pool(self) -> asyncpg.Pool:
        s = self.settings
        pool = await asyncpg.create_pool(
            s.database_url.get_secret_value(),
            min_size=1,
            max_size=2,  # the worker's cycle and the alerts' publisher
            timeout=s.db_command_timeout_seconds,
            command_timeout=s.db_command_timeout_seconds,
            server_settings={"application_name": f"fleet-sessions {member_name()}"[:63]},
        )
        assert self._stack is not None  # noqa: S101 -- set while starting
        self._stack.push_async_callback(_close_pool, pool)
        self.sessions_pool = pool
        return pool

    async def _run_sessions(self, pool: asyncio.Task[Any], producer: asyncio.Task[Any]) -> None:
        """The sessions worker once its pool is up; the alerts' publisher once the broker is."""
        await asyncio.wait({pool})
        if self.sessions_pool is None:
            return  # stopping
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(SessionWorker(self.sessions_pool, self.settings).run())
            await asyncio.wait({producer})
            if self.producer is not None:
                publisher = AlertPublisher(self.sessions_pool, self.producer, self.settings)
                tasks.create_task(publisher.run())

    def _start_consumer(
        self, stack: contextlib.AsyncExitStack
    ) -> Callable[[], Awaitable[AIOKafkaConsumer]]:
        consumer = self.consumer
        assert consumer is not None  # noqa: S101 -- made just before

        async def start() -> AIOKafkaConsumer:
            await consumer.start()
            stack.push_async_callback(consumer.stop)  # leaves the group at once
            return consumer

        return start

    async def _connect_in_background(
        self, stack: contextlib.AsyncExitStack, what: str, connect: Callable[[], Awaitable[Any]]
    ) -> asyncio.Task[Any]:
        """Connect, waiting at most a moment here, then on in the background. An error
        that waiting cannot fix (a misconfiguration) stops the service."""
        task = asyncio.create_task(_until_up(what, connect, self.stopping))
        stack.push_async_callback(_cancelled, task)
        task.add_done_callback(self._on_background_done)
        await asyncio.wait({task}, timeout=_FIRST_CONNECT_S)
        return task

    def _on_background_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self._failed = task.exception()
        log.error("dependency_failed", error=str(self._failed))
        self.stopping.set()

    # --- readiness and metrics -----------------------------------------------------------

    async def _check_store(self) -> None:
        if self.store is None:
            raise ConnectionError("not connected")
        await self.store.ping()

    async def _check_sessions_database(self) -> None:
        if self.sessions_pool is None:
            raise ConnectionError("not connected")
        await self.sessions_pool.fetchval("SELECT 1")

    async def _check_api_database(self) -> None:
        """Reachable, and (a replica) not too far behind."""
        if self.api_pool is None:
            raise ConnectionError("not connected")
        await self.replica_lag.poll(self.api_pool)
        await self.replica_lag.check()

    async def _check_broker(self) -> None:
        if self.producer is None:
            raise ConnectionError("not connected")
        try:
            await self.producer.client.fetch_all_metadata()
        except KafkaError as exc:
            raise ConnectionError(str(exc)) from exc

    def _report_pools(self) -> None:
        pools = {
            "store": self.store.pool if self.store else None,
            "api": self.api_pool,
            "sessions": self.sessions_pool,
        }
        for name, pool in pools.items():
            if pool is None:
                continue
            gauge = metrics.DB_POOL_CONNECTIONS
            gauge.labels(name, "max").set(pool.get_max_size())
            gauge.labels(name, "idle").set(pool.get_idle_size())
            gauge.labels(name, "in_use").set(pool.get_size() - pool.get_idle_size())


async def _cancelled(task: asyncio.Task[Any]) -> None:
    """Cancel a task and wait for it to end, whatever it ended with."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _close_pool(pool: asyncpg.Pool, timeout: float = 10.0) -> None:
    try:
        await asyncio.wait_for(pool.close(), timeout)
    except TimeoutError:
        pool.terminate()
