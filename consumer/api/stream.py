"""GET /v1/stream: what was committed, pushed to dashboards as Server-Sent Events.

Server-Sent Events rather than WebSocket: the stream only flows to the client, SSE is plain
HTTP (the same bearer auth, proxies, curl), and browsers reconnect with Last-Event-ID by
themselves. aiohttp-sse writes the wire format and the keep-alive pings.

Fan-out: one ChangeFeed per API process follows the change log that the write path's
triggers fill (sql/016) by transaction id, every FLEET_STREAM_POLL_INTERVAL_MS, in one
read-only snapshot, and reads the changed rows themselves: the live rows a committed batch
set (a reading that lost to a newer one set none), the alerts with a new transition, the
sessions the worker wrote. Several API replicas each follow the log; on a streaming replica
it arrives by replication like every other table.

Event ids are the log position a poll read up to (the snapshot it read in). The last event a
client gets from a poll carries it; a client that reconnects with Last-Event-ID gets, for
every change since, the row as it is now (live rows are state: the newest of a device, not
each reading), or a `reset` event when that is past the replay window. A subscriber has a
bounded queue: one that falls behind is disconnected and counted, never waited for.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog
from aiohttp import web
from aiohttp_sse import EventSourceResponse
from pydantic import Field

from consumer import metrics
from consumer.api.contract import ApiModel, MeterLive, VehicleLive
from consumer.api.deps import DEPS, ApiDeps
from consumer.api.errors import ApiError
from consumer.api.operation import Answer, Operation
from consumer.api.security import client_of
from consumer.api.sessions import ALERT_COLUMNS, SESSION_COLUMNS, alert_from, session_from
from consumer.models import DeviceId
from consumer.settings import Settings

log = structlog.get_logger(__name__)

KINDS = ("live", "alert", "session")

_SNAPSHOT = "SELECT pg_current_snapshot()::text"
# Whether a client's position is older than what pruning removed, or from the future.
_KNOWN = """
SELECT pg_snapshot_xmin($1::text::pg_snapshot) > pruned_xid
   AND pg_snapshot_xmin($1::text::pg_snapshot) <= pg_snapshot_xmax(pg_current_snapshot())
  FROM stream_horizon
"""
# The changes committed between two snapshots: $1 the earlier, $2 the later. A transaction
# still running at $1 is read once it has committed, however long it ran, without holding
# back the others. A live row counts only if this change set it (its updated_at is the
# change's transaction time); a later change streams it later.
_BETWEEN = """
s.kind = '{kind}' AND s.xid >= pg_snapshot_xmin($1::text::pg_snapshot)
AND NOT pg_visible_in_snapshot(s.xid, $1::text::pg_snapshot) AND pg_visible_in_snapshot(s.xid, $2::text::pg_snapshot)
"""
_CHANGED = """
SELECT DISTINCT c.id FROM stream_changes s, unnest(s.ids) AS c(id) WHERE {between}
"""
_LIVE = """
SELECT DISTINCT ON (d.{key}) d.*
  FROM stream_changes s
  JOIN {table} d ON d.{key} = ANY(s.ids) AND d.updated_at = s.at
 WHERE {between} AND ($3::text[] IS NULL OR d.{key} = ANY($3::text[]))
"""
_VEHICLES = _LIVE.format(
    table="vehicle_live", key="vehicle_id", between=_BETWEEN.format(kind="vehicle")
)
_METERS = _LIVE.format(table="meter_live", key="meter_id", between=_BETWEEN.format(kind="meter"))
_ALERTS = f"""
SELECT {ALERT_COLUMNS} FROM alerts
 WHERE alert_id::text IN ({_CHANGED.format(between=_BETWEEN.format(kind="alert"))})
"""
_SESSIONS = f"""
SELECT {SESSION_COLUMNS} FROM charging_sessions
 WHERE session_id::text IN ({_CHANGED.format(between=_BETWEEN.format(kind="session"))})
"""
# A snapshot as PostgreSQL writes it: xmin:xmax:xip,...
_POSITION = re.compile(r"[0-9]{1,20}:[0-9]{1,20}:([0-9]{1,20}(,[0-9]{1,20})*)?")


class StreamQuery(ApiModel):
    vehicle_id: list[DeviceId] | None = Field(
        default=None, description="Only these vehicles (repeatable); with meterId: either."
    )
    meter_id: list[DeviceId] | None = Field(
        default=None, description="Only these meters (repeatable)."
    )
    kinds: str | None = Field(
        default=None,
        description="Comma-separated event kinds: live, alert, session (default: all).",
        pattern=r"^(live|alert|session)(,(live|alert|session))*$",
        examples=["live,alert"],
    )


class StreamEvents(ApiModel):
    """Documents the stream; the events themselves are text/event-stream."""

    live: VehicleLive | MeterLive = Field(description="event: live, a device's new live row")
    alert: dict[str, Any] = Field(description="event: alert, as GET /v1/alerts lists it")
    session: dict[str, Any] = Field(description="event: session, as GET /v1/sessions/{id}")
    reset: dict[str, str] = Field(
        description="event: reset, {reason}: what was missed is past the replay window; "
        "fetch the state again"
    )


@dataclass(frozen=True)
class Event:
    """One event as sent, serialised once for every subscriber, and whom it is about."""

    name: str
    data: str
    vehicles: frozenset[str] = frozenset()
    meters: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Interest:
    kinds: frozenset[str]
    vehicles: frozenset[str]
    meters: frozenset[str]

    def wants(self, event: Event) -> bool:
        if event.name not in self.kinds:
            return False
        if not self.vehicles and not self.meters:
            return True
        return bool(event.vehicles & self.vehicles or event.meters & self.meters)


# What a subscriber's queue holds: (position, events) per poll, or None once it is dropped.
Batch = tuple[str, list[Event]] | None


@dataclass(eq=False)
class Subscriber:
    interest: Interest
    client: str
    queue: asyncio.Queue[Batch]
    dropped: str | None = None

    def offer(self, position: str, events: list[Event]) -> None:
        wanted = [e for e in events if self.interest.wants(e)]
        if not wanted or self.dropped is not None:
            return
        try:
            self.queue.put_nowait((position, wanted))
        except asyncio.QueueFull:
            self.drop("queue_full")

    def drop(self, reason: str) -> None:
        """Disconnect, counted: the client fell behind."""
        self.dropped = reason
        metrics.STREAM_DROPPED.labels(reason).inc()
        log.info("stream_subscriber_dropped", reason=reason, client=self.client)
        self.end()

    def end(self) -> None:
        """Tell the pump to stop; what is still queued is discarded."""
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)


@dataclass(eq=False)
class Audience:
    """The feed's subscribers, indexed by the devices they asked for: an event is matched
    against those who may want it, not against every subscriber."""

    everyone: set[Subscriber] = field(default_factory=set)  # no device filter
    by_vehicle: dict[str, set[Subscriber]] = field(default_factory=dict)
    by_meter: dict[str, set[Subscriber]] = field(default_factory=dict)
    per_client: Counter[str] = field(default_factory=Counter)
    size: int = 0
    joined: int = 0  # subscribers added so far: a read restricted to `devices()` before a
    # subscriber joined may have left out its devices

    def add(self, subscriber: Subscriber) -> None:
        interest = subscriber.interest
        if not interest.vehicles and not interest.meters:
            self.everyone.add(subscriber)
        for vehicle in interest.vehicles:
            self.by_vehicle.setdefault(vehicle, set()).add(subscriber)
        for meter in interest.meters:
            self.by_meter.setdefault(meter, set()).add(subscriber)
        self.per_client[subscriber.client] += 1
        self.size += 1
        self.joined += 1

    def remove(self, subscriber: Subscriber) -> None:
        self.everyone.discard(subscriber)
        for index, ids in (
            (self.by_vehicle, subscriber.interest.vehicles),
            (self.by_meter, subscriber.interest.meters),
        ):
            for device in ids:
                index[device].discard(subscriber)
                if not index[device]:
                    del index[device]
        self.per_client[subscriber.client] -= 1
        if not self.per_client[subscriber.client]:
            del self.per_client[subscriber.client]
        self.size -= 1

    def __iter__(self) -> Iterator[Subscriber]:
        seen = set(self.everyone)
        seen.update(*self.by_vehicle.values(), *self.by_meter.values())
        return iter(seen)

    def devices(self) -> tuple[list[str] | None, list[str] | None]:
        """The vehicles and meters anyone asked for; None when someone asked for all."""
        if self.everyone:
            return None, None
        return list(self.by_vehicle), list(self.by_meter)

    def deliver(self, position: str, events: list[Event]) -> None:
        batches: dict[Subscriber, list[Event]] = {}
        for event in events:
            audience = set(self.everyone)
            for vehicle in event.vehicles:
                audience.update(self.by_vehicle.get(vehicle, ()))
            for meter in event.meters:
                audience.update(self.by_meter.get(meter, ()))
            for subscriber in audience:
                batches.setdefault(subscriber, []).append(event)
        for subscriber, matched in batches.items():
            subscriber.offer(position, matched)


@dataclass(eq=False)
class ChangeFeed:
    """Follows the change log for one API process, from the first subscriber on."""

    pool: asyncpg.Pool
    settings: Settings
    position: str | None = None
    subscribers: Audience = field(default_factory=Audience)
    _task: asyncio.Task[None] | None = None

    async def attach(self, subscriber: Subscriber) -> str:
        """Add a subscriber; the position from which the feed delivers to it."""
        if self.position is None:
            self.position = await self.pool.fetchval(_SNAPSHOT)
        if self._task is None:
            self._task = asyncio.create_task(self._follow())
        self.subscribers.add(subscriber)
        metrics.STREAM_SUBSCRIBERS.set(self.subscribers.size)
        return self.position

    def detach(self, subscriber: Subscriber) -> None:
        self.subscribers.remove(subscriber)
        metrics.STREAM_SUBSCRIBERS.set(self.subscribers.size)

    async def close(self) -> None:
        """Stop following and end every stream (the server is shutting down)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for subscriber in self.subscribers:
            subscriber.end()

    async def read(
        self,
        since: str,
        until: str | None = None,
        devices: tuple[list[str] | None, list[str] | None] = (None, None),
    ) -> tuple[str, list[Event]]:
        """The events committed after snapshot `since` up to `until` (default: now), and
        that snapshot; live rows only of `devices` (vehicles, meters; None: all)."""
        vehicles, meters = devices
        async with (
            self.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            bound: str = until or await conn.fetchval(_SNAPSHOT)
            if bound == since:
                return bound, []
            return bound, [
                *map(_vehicle_event, await conn.fetch(_VEHICLES, since, bound, vehicles)),
                *map(_meter_event, await conn.fetch(_METERS, since, bound, meters)),
                *map(_alert_event, await conn.fetch(_ALERTS, since, bound)),
                *map(_session_event, await conn.fetch(_SESSIONS, since, bound)),
            ]

    async def _read_for_subscribers(self) -> tuple[str, list[Event]]:
        """What is new, with live rows only of the devices someone follows (the bulk of the
        log). A subscriber that joins during a read may follow devices it left out: then
        the same range is read again, and after a few tries for every device."""
        assert self.position is not None  # noqa: S101 -- set before the task starts
        for _ in range(3):
            joined = self.subscribers.joined
            read = await self.read(self.position, devices=self.subscribers.devices())
            if self.subscribers.joined == joined:
                return read
        return await self.read(self.position)

    async def knows(self, position: str) -> bool:
        """Whether the log still holds every change after `position`."""
        known: bool = await self.pool.fetchval(_KNOWN, position)
        return known

    async def _follow(self) -> None:
        interval = self.settings.stream_poll_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            try:
                position, events = await self._read_for_subscribers()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                metrics.STREAM_POLL_ERRORS.inc()
                log.warning("stream_poll_failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1)
                continue
            self.position = position
            self.subscribers.deliver(position, events)


def _vehicle_event(row: asyncpg.Record) -> Event:
    body = VehicleLive.model_validate(dict(row)).body()
    return Event("live", json.dumps(body), vehicles=frozenset([row["vehicle_id"]]))


def _meter_event(row: asyncpg.Record) -> Event:
    body = MeterLive.model_validate(dict(row)).body()
    return Event("live", json.dumps(body), meters=frozenset([row["meter_id"]]))


def _alert_event(row: asyncpg.Record) -> Event:
    # The subject is a vehicle or a meter: either filter may name it.
    subject = frozenset([row["subject"]])
    return Event("alert", json.dumps(alert_from(row).body()), vehicles=subject, meters=subject)


def _session_event(row: asyncpg.Record) -> Event:
    meters = frozenset([row["meter_id"]]) if row["meter_id"] else frozenset()
    return Event(
        "session",
        json.dumps(session_from(row).body()),
        vehicles=frozenset([row["vehicle_id"]]),
        meters=meters,
    )


def _interest(query: StreamQuery) -> Interest:
    kinds = frozenset(query.kinds.split(",")) if query.kinds else frozenset(KINDS)
    return Interest(kinds, frozenset(query.vehicle_id or ()), frozenset(query.meter_id or ()))


def _admit(deps: ApiDeps, feed: ChangeFeed, client: str) -> None:
    settings = deps.settings
    if feed.subscribers.size >= settings.stream_max_subscribers:
        raise ApiError(
            503,
            "too_many_streams",
            "this process serves as many streams as it may; retry shortly",
            {"Retry-After": "5"},
        )
    if feed.subscribers.per_client[client] >= settings.stream_max_per_client:
        raise ApiError(
            429,
            "too_many_streams",
            f"at most {settings.stream_max_per_client} open streams per client",
            {"Retry-After": "5"},
        )


async def stream(request: web.Request, query: StreamQuery) -> web.StreamResponse:
    deps = request.app[DEPS]
    settings = deps.settings
    if deps.change_feed is None:
        deps.change_feed = ChangeFeed(deps.require_pool(), settings)
    feed = deps.change_feed
    last = request.headers.get("Last-Event-ID")
    if last is not None and not _POSITION.fullmatch(last):
        raise ApiError(400, "invalid_last_event_id", "Last-Event-ID is not an id this stream sent")
    client = client_of(request)
    _admit(deps, feed, client)

    subscriber = Subscriber(_interest(query), client, asyncio.Queue(settings.stream_queue_polls))
    position = await feed.attach(subscriber)
    try:
        missed: list[Event] | None = []
        if last is not None:
            missed = await _missed(feed, last, position)
        response = EventSourceResponse(
            send_timeout=settings.stream_send_timeout_seconds,
            ping_interval=settings.stream_keepalive_seconds,
        )
        await response.prepare(request)
        if missed is None:
            await _send(
                response, position, [Event("reset", '{"reason": "replay_window_exceeded"}')]
            )
        else:
            await _send(response, position, [e for e in missed if subscriber.interest.wants(e)])
        await _pump(response, subscriber)
    finally:
        feed.detach(subscriber)
    return response


async def _missed(feed: ChangeFeed, last: str, position: str) -> list[Event] | None:
    """What changed between the client's last event and where the feed takes over; None
    when that is no longer known (pruned, or an id from another database)."""
    if not await feed.knows(last):
        return None
    _, events = await feed.read(last, until=position)
    return events


async def _pump(response: EventSourceResponse, subscriber: Subscriber) -> None:
    """Send what the feed queues until the client goes (its pings fail) or is dropped."""
    gone = asyncio.create_task(response.wait())
    try:
        while True:
            take = asyncio.create_task(subscriber.queue.get())
            await asyncio.wait({take, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not take.done():
                take.cancel()
                return
            batch = take.result()
            if batch is None:
                return
            try:
                await _send(response, *batch)
            except TimeoutError:
                subscriber.drop("send_timeout")
                return
            except ConnectionResetError:
                return
    finally:
        gone.cancel()


async def _send(response: EventSourceResponse, position: str, events: list[Event]) -> None:
    for i, event in enumerate(events):
        last = i == len(events) - 1
        await response.send(event.data, event=event.name, id=position if last else None)
        metrics.STREAM_EVENTS.labels(event.name).inc()


STREAM_OPERATION = Operation(
    "GET",
    "/v1/stream",
    "stream",
    "Committed changes as Server-Sent Events: live rows, alert transitions, sessions",
    stream,
    {
        200: Answer(
            "text/event-stream: `event: live|alert|session|reset`, `data:` JSON as in "
            "StreamEvents, `id:` on the last event of each read (send it back as "
            "Last-Event-ID to resume within FLEET_STREAM_REPLAY_SECONDS); `: ping` comments "
            "every FLEET_STREAM_KEEPALIVE_SECONDS. A client that falls behind by "
            "FLEET_STREAM_QUEUE_POLLS reads is disconnected.",
            StreamEvents,
            media_type="text/event-stream",
        ),
        429: Answer("too_many_streams: FLEET_STREAM_MAX_PER_CLIENT are open (Retry-After)."),
        503: Answer(
            "too_many_streams: FLEET_STREAM_MAX_SUBSCRIBERS are open in this process; "
            "not_ready: no database yet (Retry-After)."
        ),
    },
    query=StreamQuery,
    refusals=("invalid_last_event_id (not an id this stream sends)",),
)
