"""GET /v1/stream: what the consumer commits reaches a subscriber, only that, and a client
that reconnects gets what it missed.

Readings go through Kafka and the real consumer; the stream is read over a real HTTP
connection and parsed as a browser would (event, data, id; comments ignored).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from consumer.api.app import make_app
from consumer.api.deps import ApiDeps
from consumer.api.routes import api_routes
from consumer.settings import Settings
from devtools.factories import meter, vehicle
from tests.integration.test_sessions import ingest


@dataclass
class Message:
    event: str
    data: Any
    id: str | None


class Stream:
    """A subscriber: its events as they arrive, parsed from the text/event-stream."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.events: list[Message] = []
        self.last_id: str | None = None
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            await self._parse()
        except aiohttp.ClientConnectionError:
            return  # closed: by us, or by the server dropping this subscriber

    async def _parse(self) -> None:
        event, data, id_ = "message", [], None
        async for raw in self.response.content:
            line = raw.decode().rstrip("\r\n")
            if not line:
                if data:
                    self.events.append(Message(event, json.loads("\n".join(data)), id_))
                    if id_ is not None:
                        self.last_id = id_
                event, data, id_ = "message", [], None
            elif line.startswith(":"):
                continue
            else:
                name, _, value = line.partition(": ")
                if name == "event":
                    event = value
                elif name == "data":
                    data.append(value)
                elif name == "id":
                    id_ = value

    async def close(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        self.response.close()

    def live(self, device: str) -> list[Any]:
        return [
            m.data
            for m in self.events
            if m.event == "live" and device in (m.data.get("vehicleId"), m.data.get("meterId"))
        ]


def api(settings: Settings, pool: asyncpg.Pool, **overrides: Any) -> TestServer:
    configured = settings.model_copy(update={"stream_poll_interval_ms": 50, **overrides})
    return TestServer(make_app({}, deps=ApiDeps(configured, pool=pool), routes=api_routes()))


@pytest.fixture
async def client(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(api(settings, pool)) as test_client:
        yield test_client


async def subscribe(
    client: TestClient[Any, Any], query: str, last_event_id: str | None = None
) -> Stream:
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    response = await client.get(f"/v1/stream?{query}", headers=headers)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return Stream(response)


async def test_a_committed_reading_is_streamed_to_those_who_asked_for_its_device(
    settings: Settings, client: TestClient[Any, Any]
) -> None:
    probe = await subscribe(client, "vehicleId=v-1&meterId=m-1&kinds=live")
    everything = await subscribe(client, "")
    await ingest(settings, [vehicle("v-1", 10), vehicle("v-2", 10), meter("m-1", 10)])
    await eventually(lambda: _has(probe, "v-1") and _has(probe, "m-1"), timeout=10)
    await eventually(lambda: _has(everything, "v-2"), timeout=10)

    # The same fields and values as GET .../live, and nothing about other devices.
    live = await (await client.get("/v1/vehicles/v-1/live")).json()
    assert probe.live("v-1") == [live]
    assert probe.live("v-2") == []
    assert {m.event for m in probe.events} == {"live"}
    assert probe.last_id is not None
    await probe.close()
    await everything.close()


async def test_a_reading_that_loses_to_a_newer_one_is_not_streamed(
    settings: Settings, client: TestClient[Any, Any]
) -> None:
    stream = await subscribe(client, "vehicleId=v-1&vehicleId=v-9")
    await ingest(settings, [vehicle("v-1", 20, soc=80.0)])
    await eventually(lambda: _has(stream, "v-1"), timeout=10)
    # An older reading of v-1 is stored in history but does not change its live row; v-9's
    # later batch shows when the feed has read past it.
    await ingest(settings, [vehicle("v-1", 5, soc=10.0)])
    await ingest(settings, [vehicle("v-9", 5)])
    await eventually(lambda: _has(stream, "v-9"), timeout=10)
    assert [e["soc"] for e in stream.live("v-1")] == [80.0]
    await stream.close()


async def test_a_client_that_reconnects_gets_what_it_missed_or_a_reset(
    settings: Settings, client: TestClient[Any, Any], db: asyncpg.Connection
) -> None:
    first = await subscribe(client, "vehicleId=v-1")
    await ingest(settings, [vehicle("v-1", 30)])
    await eventually(lambda: _has(first, "v-1"), timeout=10)
    last_id = first.last_id
    assert last_id is not None
    await first.close()

    await ingest(settings, [vehicle("v-1", 31), vehicle("v-2", 31)])  # while away
    resumed = await subscribe(client, "vehicleId=v-1", last_event_id=last_id)
    await eventually(lambda: _has(resumed, "v-1"), timeout=10)
    assert [e["timestamp"] for e in resumed.live("v-1")] == [vehicle("v-1", 31)["timestamp"]]
    await resumed.close()

    # Past the replay window (pruned), the client is told to start over.
    await db.execute("SELECT fleet_prune_stream(interval '0 seconds')")
    reset = await subscribe(client, "vehicleId=v-1", last_event_id=last_id)
    await eventually(lambda: bool(reset.events), timeout=10)
    assert reset.events[0].event == "reset"
    assert reset.events[0].data == {"reason": "replay_window_exceeded"}
    await reset.close()

    garbage = await client.get("/v1/stream", headers={"Last-Event-ID": "yesterday"})
    assert garbage.status == 400
    assert (await garbage.json())["error"]["code"] == "invalid_last_event_id"


async def eventually(check: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110 -- the reader task appends; a poll is simplest
            await asyncio.sleep(0.02)


def _has(stream: Stream, device: str) -> bool:
    return bool(stream.live(device))


async def test_alert_transitions_and_sessions_are_streamed_as_the_api_shows_them(
    client: TestClient[Any, Any], db: asyncpg.Connection
) -> None:
    stream = await subscribe(client, "vehicleId=v-7&kinds=alert,session")
    async with db.transaction():  # as the sessions worker writes them
        alert_id = await db.fetchval(
            "INSERT INTO alerts (kind, subject, state, opened_at, evidence) "
            "VALUES ('battery_overheat', 'v-7', 'open', now(), '{}') RETURNING alert_id"
        )
        await db.execute(
            "INSERT INTO alert_transitions (alert_id, state, at, evidence) "
            "VALUES ($1, 'open', now(), '{}')",
            alert_id,
        )
        await db.execute(
            "INSERT INTO charging_sessions (session_id, vehicle_id, meter_id, started_at, "
            "ended_at, state, kwh_delivered_dc, kwh_consumed_ac, efficiency_ratio, status, "
            "soc_start, soc_end, max_battery_temp, readings) VALUES (gen_random_uuid(), 'v-7', "
            "'m-7', now(), now(), 'open', 1.2, 1.3, 0.9231, 'normal', 50, 51, 30, 2)"
        )
    await eventually(lambda: {m.event for m in stream.events} == {"alert", "session"}, 10)
    alert = next(m.data for m in stream.events if m.event == "alert")
    assert alert == (await (await client.get("/v1/alerts?subject=v-7")).json())["alerts"][0]
    session = next(m.data for m in stream.events if m.event == "session")
    shown = await client.get(f"/v1/sessions/{session['sessionId']}")
    assert session == await shown.json()
    await stream.close()
