"""Exactly once through crashes, rebalances, outages and zombies."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiokafka import TopicPartition
from prometheus_client import REGISTRY
from pydantic import SecretStr

from consumer.batch import build_batch
from consumer.decode import Limits
from consumer.errors import Fenced
from consumer.kafka import ensure_topics
from consumer.models import Stream
from consumer.service import Service
from consumer.settings import Settings
from consumer.store import Store
from devtools.factories import encode, expected_history, mixed_fleet
from devtools.processes import ConsumerProcess
from devtools.stack import start_broker
from tests.conftest import ARTIFACTS, wait_until
from tests.integration.helpers import (
    history_keys,
    offsets_reach,
    publish,
    publish_to_partition,
    running_service,
    stored_offsets,
)
from tests.integration.processes import TcpProxy, consumer_process

FENCES = 'SELECT topic, "partition", fence FROM consumer_offsets ORDER BY 1, 2'
BAD_EVERY = 97  # a malformed message every so often: dead letters have no unique key,
# so a message processed twice would show up as a second dead letter.


def stream_with_rejects(meters: int, vehicles: int, rounds: int) -> tuple[list, list[tuple]]:
    readings = mixed_fleet(meters, vehicles, rounds)
    messages: list[tuple] = []
    for i, reading in enumerate(readings):
        messages.append(encode(reading))
        if i % BAD_EVERY == 0:
            messages.append((b"bad", f"not json {i}".encode()))
    return readings, messages


async def assert_exactly_once(
    db: asyncpg.Connection, settings: Settings, readings: list, messages: list[tuple]
) -> None:
    meters = await history_keys(db, "meter_history", "meter_id")
    vehicles = await history_keys(db, "vehicle_history", "vehicle_id")
    assert set(meters) == expected_history(readings, "meterId")
    assert set(vehicles) == expected_history(readings, "vehicleId")
    bad = [v for _, v in messages if v.startswith(b"not json")]
    letters = await db.fetch('SELECT payload, "partition", "offset" FROM dead_letters')
    assert sorted(r["payload"] for r in letters) == sorted(bad)  # none lost, none twice
    stored = await db.fetchval(
        "SELECT sum(next_offset) FROM consumer_offsets WHERE topic = $1", settings.mixed_topic
    )
    assert stored == len(messages)


async def history_count(db: asyncpg.Connection) -> int:
    return await db.fetchval(
        "SELECT (SELECT count(*) FROM meter_history) + (SELECT count(*) FROM vehicle_history)"
    )


@pytest.fixture
def small_batches(settings: Settings) -> Settings:
    return settings.model_copy(update={"batch_max_records": 200})


async def test_consumer_killed_with_sigkill_again_and_again_loses_and_duplicates_nothing(
    small_batches: Settings, db: asyncpg.Connection
) -> None:
    """A short kill -9 loop: killed mid-stream three times, restarted each time; every
    reading stored once, every reject recorded once."""
    settings = small_batches
    readings, messages = stream_with_rejects(meters=100, vehicles=100, rounds=60)
    await publish(settings.kafka_bootstrap_servers, settings.mixed_topic, messages)

    for kill in range(1, 4):
        victim = consumer_process(settings, f"killed-{kill}")
        try:
            await wait_until(lambda n=kill: _at_least(db, n * 2000), timeout=60)
        finally:
            victim.signal(signal.SIGKILL)
            await victim.wait()
    assert await history_count(db) < len(readings), "killed too late to prove anything"

    survivor = consumer_process(settings, "survivor", "--idle-timeout", "3")
    assert await survivor.wait(timeout=120) == 0, survivor.output()
    await assert_exactly_once(db, settings, readings, messages)


async def test_members_joining_and_leaving_mid_stream_lose_and_duplicate_nothing(
    small_batches: Settings, db: asyncpg.Connection
) -> None:
    """A second member joins mid-stream and the first leaves (SIGTERM): exactly once throughout."""
    settings = small_batches
    readings, messages = stream_with_rejects(meters=100, vehicles=100, rounds=60)
    half = len(messages) // 2
    await publish(settings.kafka_bootstrap_servers, settings.mixed_topic, messages[:half])

    first = consumer_process(settings, "first")
    second: ConsumerProcess | None = None
    try:
        await wait_until(lambda: _at_least(db, 1000), timeout=60)
        second = consumer_process(settings, "second", "--idle-timeout", "6")
        await publish(settings.kafka_bootstrap_servers, settings.mixed_topic, messages[half:])
        await wait_until(lambda: _owner_committed(db, second), timeout=60)
        first.signal(signal.SIGTERM)
        assert await first.wait() == 0, first.output()
        assert "stopped" in first.output()
        assert await second.wait(timeout=120) == 0, second.output()
    finally:
        for p in (first, second):
            if p is not None and p.process.poll() is None:
                p.kill()
    await assert_exactly_once(db, settings, readings, messages)


async def test_rebalances_while_readings_keep_arriving_lose_and_duplicate_nothing(
    small_batches: Settings, db: asyncpg.Connection
) -> None:
    """Readings arrive steadily while a second member joins and leaves again: each
    rebalance re-claims partitions while records keep coming; every one is stored once."""
    settings = small_batches
    readings, messages = stream_with_rejects(meters=60, vehicles=60, rounds=30)
    chunks = [messages[i : i + 100] for i in range(0, len(messages), 100)]

    async def publish_steadily() -> None:
        for chunk in chunks:
            await publish(settings.kafka_bootstrap_servers, settings.mixed_topic, chunk)
            await asyncio.sleep(0.05)

    async with running_service(settings):
        publisher = asyncio.create_task(publish_steadily())
        await wait_until(lambda: _at_least(db, 200), timeout=60)
        second = consumer_process(settings, "joiner")
        try:
            await wait_until(lambda: _owner_committed(db, second), timeout=60)
            second.signal(signal.SIGTERM)
            assert await second.wait() == 0, second.output()
        finally:
            if second.process.poll() is None:
                second.kill()
        await publisher
        await wait_until(lambda: _offsets_at(db, settings, len(messages)), timeout=90)
    await assert_exactly_once(db, settings, readings, messages)


async def test_database_outage_pauses_then_catches_up_with_nothing_lost(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """Connections terminated and refused for a while: the consumer waits in the group, then catches up."""
    proxy = TcpProxy(settings.database_url.get_secret_value())
    await proxy.start()
    settings = settings.model_copy(update={"database_url": SecretStr(proxy.dsn)})
    readings, messages = stream_with_rejects(meters=50, vehicles=50, rounds=20)
    third = len(messages) // 3
    await publish(settings.kafka_bootstrap_servers, settings.mixed_topic, messages[:third])

    service = Service(settings)
    assert await service.start()
    assert service.pipeline is not None and service.consumer is not None
    runner = asyncio.create_task(service.pipeline.run())
    try:
        await wait_until(lambda: _at_least(db, 100), timeout=60)
        await proxy.cut()
        await publish(settings.kafka_bootstrap_servers, settings.mixed_topic, messages[third:])
        await asyncio.sleep(4)  # several retries' worth of outage
        assert not runner.done(), "the consumer must wait, not crash"
        assert service.consumer.assignment(), "the consumer must stay in the group"
        assert set(service.consumer.paused()) == service.consumer.assignment()
        await proxy.start()
        await wait_until(lambda: _at_least(db, len(readings)), timeout=60)
        await wait_until(lambda: _offsets_at(db, settings, len(messages)), timeout=30)
    finally:
        service.pipeline.stop()
        await runner
        await service.stop()
        await proxy.cut()
    await assert_exactly_once(db, settings, readings, messages)


async def test_a_rebalance_during_a_database_outage_loses_nothing_when_it_ends(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """The group reassigns the partitions while PostgreSQL is away, readings keep arriving;
    the member claims once the database is back and reads on from the stored offsets,
    with polls still in flight from the outage: every reading is stored once."""
    proxy = TcpProxy(settings.database_url.get_secret_value())
    await proxy.start()
    settings = settings.model_copy(update={"database_url": SecretStr(proxy.dsn)})
    readings, messages = stream_with_rejects(meters=50, vehicles=50, rounds=20)
    half = len(messages) // 2
    await publish(settings.kafka_bootstrap_servers, settings.mixed_topic, messages[:half])
    try:
        async with running_service(settings) as service:
            assert service.consumer is not None and service.pipeline is not None
            await wait_until(lambda: _offsets_at(db, settings, half))
            await proxy.cut()
            await publish(settings.kafka_bootstrap_servers, settings.mixed_topic, messages[half:])
            # A rebalance through the broker: every partition revoked and assigned again.
            service.consumer.subscribe(list(settings.topics), listener=service.listener)
            await wait_until(lambda: _pending(service), timeout=30)
            await asyncio.sleep(2)  # claims retried, polls in flight meanwhile
            await proxy.start()
            await wait_until(lambda: _offsets_at(db, settings, len(messages)), timeout=60)
    finally:
        await proxy.cut()
    await assert_exactly_once(db, settings, readings, messages)


async def _pending(service: Service) -> bool:
    return bool(service.pipeline and service.pipeline.book.pending)


async def test_a_client_that_skips_ahead_is_sent_back_and_nothing_is_lost(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """The class of fault make chaos once found: the Kafka client's position moves past
    records the pipeline never saw. The next read starts past what the member has read;
    it goes back, reads the skipped records, and every reading is stored once."""
    settings = settings.model_copy(update={"batch_max_records": 50})
    readings = mixed_fleet(meters=20, vehicles=20, rounds=30)
    tp = TopicPartition(settings.mixed_topic, 0)
    async with running_service(settings) as service:
        assert service.consumer is not None
        await publish_to_partition(settings.kafka_bootstrap_servers, tp.topic, 0, readings[:100])
        await wait_until(lambda: offsets_reach(db, tp.topic, 100))
        position = await service.consumer.position(tp)
        await publish_to_partition(settings.kafka_bootstrap_servers, tp.topic, 0, readings[100:])
        service.consumer.seek(tp, position + 300)  # behind the pipeline's back
        await wait_until(lambda: offsets_reach(db, tp.topic, len(readings)))
    meters = await history_keys(db, "meter_history", "meter_id")
    vehicles = await history_keys(db, "vehicle_history", "vehicle_id")
    assert sorted(meters) == sorted(expected_history(readings, "meterId"))
    assert sorted(vehicles) == sorted(expected_history(readings, "vehicleId"))


async def test_a_member_that_lost_its_partitions_cannot_commit_a_stale_batch(
    settings: Settings, database: str, db: asyncpg.Connection
) -> None:
    """The fence: once another member claimed a partition, the old owner's batch is refused whole."""
    zombie = await Store.open(database, group_id=settings.group_id, owner="zombie")
    successor = await Store.open(database, group_id=settings.group_id, owner="successor")
    try:
        tp = (settings.mixed_topic, 0)
        zombie_claims = await zombie.claim([tp])
        successor_claims = await successor.claim([tp])
        assert successor_claims[tp].fence > zombie_claims[tp].fence

        class Msg:
            topic, partition, key = settings.mixed_topic, 0, b"m-1"

            def __init__(self, offset: int, value: bytes) -> None:
                self.offset, self.value = offset, value

        _, value = encode(mixed_fleet(1, 0, 1)[0])
        batch = build_batch(
            [Msg(0, value), Msg(1, b"junk")],
            {settings.mixed_topic: None},
            now=datetime.now(UTC),
            limits=Limits(),
        )
        with pytest.raises(Fenced):
            await zombie.write(batch, zombie_claims)
        assert await history_count(db) == 0
        assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0

        result = await successor.write(batch, successor_claims)
        assert result.counts[Stream.METER].stored == 1
        assert await db.fetchval("SELECT next_offset FROM consumer_offsets") == 2
        # The same batch again, as after a commit whose answer was lost: recognised as
        # committed, and nothing is written twice.
        retried = await successor.write(batch, successor_claims)
        assert retried.committed_earlier
        assert await history_count(db) == 1
        assert await db.fetchval("SELECT count(*) FROM dead_letters") == 1
        with pytest.raises(Fenced):  # still refused to the zombie
            await zombie.write(batch, zombie_claims)
    finally:
        await zombie.close()
        await successor.close()


async def _at_least(db: asyncpg.Connection, n: int) -> bool:
    return await history_count(db) >= n


async def _owner_committed(db: asyncpg.Connection, member: ConsumerProcess) -> bool:
    return bool(
        await db.fetchval(
            "SELECT count(*) FROM consumer_offsets WHERE owner LIKE '%' || $1 AND next_offset IS NOT NULL",
            member.member,
        )
    )


async def _offsets_at(db: asyncpg.Connection, settings: Settings, n: int) -> bool:
    return await stored_offsets(db, settings.mixed_topic) == n


async def test_a_broker_that_lost_its_log_is_noticed_and_consumption_resumes(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """The broker restarts empty (topics recreated, offsets start over): the consumer alerts
    with a log line and a metric, and stores the new records instead of waiting for ever."""
    broker = start_broker(ARTIFACTS)  # this test's own broker, to restart
    bootstrap = broker.bootstrap_servers
    settings = settings.model_copy(update={"kafka_bootstrap_servers": bootstrap})
    topics = [*settings.topics, settings.dlq_topic]
    before, after = mixed_fleet(10, 10, 5), mixed_fleet(10, 10, 8)[-60:]  # later minutes
    try:
        await ensure_topics(bootstrap, topics, partitions=4)
        await publish(bootstrap, settings.mixed_topic, [encode(r) for r in before])
        async with running_service(settings):
            await wait_until(lambda: _offsets_at(db, settings, len(before)))
            broker.stop()
            broker.start()  # same port, nothing kept
            await ensure_topics(bootstrap, topics, partitions=4)
            await publish(bootstrap, settings.mixed_topic, [encode(r) for r in after])
            await wait_until(lambda: _offsets_at(db, settings, len(after)), timeout=90)
    finally:
        broker.stop()
    assert await history_count(db) == len(before) + len(after)
    resets = REGISTRY.get_sample_value("fleet_offset_resets_total", {"topic": settings.mixed_topic})
    assert resets is not None and resets >= 1


async def test_an_outage_longer_than_max_poll_interval_does_not_cost_the_partitions(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """While the database is gone for longer than max.poll.interval.ms, the consumer keeps
    polling with its partitions paused: no rebalance (no partition re-claimed), then it catches up."""
    proxy = TcpProxy(settings.database_url.get_secret_value())
    await proxy.start()
    settings = settings.model_copy(
        update={"database_url": SecretStr(proxy.dsn), "max_poll_interval_ms": 4000}
    )
    readings, messages = stream_with_rejects(meters=20, vehicles=20, rounds=10)
    half = len(messages) // 2
    await publish(settings.kafka_bootstrap_servers, settings.mixed_topic, messages[:half])
    try:
        async with running_service(settings):
            await wait_until(lambda: _offsets_at(db, settings, half))
            fences = await db.fetch(FENCES)
            await proxy.cut()
            await publish(settings.kafka_bootstrap_servers, settings.mixed_topic, messages[half:])
            await asyncio.sleep(10)  # 2.5 x max.poll.interval.ms without a database
            await proxy.start()
            # One more message after the catch-up: had the member left the group, it would
            # rejoin and re-claim (bumping the fences) before storing this one.
            extra = (b"bad", b"not json after the outage")
            await publish(settings.kafka_bootstrap_servers, settings.mixed_topic, [extra])
            await wait_until(lambda: _offsets_at(db, settings, len(messages) + 1))
            assert await db.fetch(FENCES) == fences
    finally:
        await proxy.cut()
    await assert_exactly_once(db, settings, readings, [*messages, extra])


async def test_a_zombie_stopped_mid_write_is_fenced_when_it_wakes(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """SIGSTOP a consumer while its batch is on its way to PostgreSQL, for longer than the
    session timeout; another member takes the partitions and commits; SIGCONT: the stale
    batch reaches the server and is refused by the fence. Nothing lost, nothing twice."""
    proxy = TcpProxy(settings.database_url.get_secret_value())
    await proxy.start()
    readings, messages = stream_with_rejects(meters=20, vehicles=20, rounds=15)
    third = len(messages) // 3
    bootstrap = settings.kafka_bootstrap_servers
    await publish(bootstrap, settings.mixed_topic, messages[:third])
    zombie = consumer_process(
        settings.model_copy(update={"database_url": SecretStr(proxy.dsn)}), "zombie"
    )
    successor: ConsumerProcess | None = None
    try:
        await wait_until(lambda: _offsets_at(db, settings, third))
        proxy.hold()  # the zombie's next write leaves it but does not reach the server
        await publish(bootstrap, settings.mixed_topic, messages[third : 2 * third])
        await wait_until(lambda: _held(proxy))
        zombie.signal(signal.SIGSTOP)
        successor = consumer_process(settings, "successor")
        await wait_until(lambda: _offsets_at(db, settings, 2 * third), timeout=90)
        proxy.release()  # the stale write arrives now, with the zombie's old fence
        await asyncio.sleep(1)
        zombie.signal(signal.SIGCONT)
        await wait_until(lambda: _logged(zombie, "batch_fenced"))
        await publish(bootstrap, settings.mixed_topic, messages[2 * third :])
        await wait_until(lambda: _logged(zombie, "partitions_assigned", after="batch_fenced"))
        await wait_until(lambda: _offsets_at(db, settings, len(messages)), timeout=90)
    finally:
        for member in (zombie, successor):
            if member is not None:
                member.signal(signal.SIGCONT)
                member.kill()
        await proxy.cut()
    await assert_exactly_once(db, settings, readings, messages)
    # Woken, it waits for the group's verdict instead of taking back what it was fenced from.
    woken = _events(zombie)[_events(zombie).index("batch_fenced") :]
    assert "partitions_claimed" not in woken[: woken.index("partitions_assigned")]


async def test_partitions_revoked_while_being_claimed_do_not_stop_the_consumer(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """A rebalance that takes partitions away in the middle of a claim (here: while the member
    asks the broker where its fresh partitions start) is no error: the member claims what it
    still has and stores its readings once."""
    readings = mixed_fleet(meters=40, vehicles=0, rounds=5)
    await publish(settings.kafka_bootstrap_servers, settings.meter_topic, map(encode, readings))
    service = Service(settings)
    assert await service.start()
    assert service.pipeline is not None and service.consumer is not None
    consumer, gate, at_gate = service.consumer, asyncio.Event(), asyncio.Event()
    for name in ("beginning_offsets", "seek_to_beginning"):  # where a claim looks the start up
        setattr(consumer, name, _gated(getattr(consumer, name), gate, at_gate))
    runner = asyncio.create_task(service.pipeline.run())
    try:
        await asyncio.wait_for(at_gate.wait(), timeout=30)
        # A rebalance through the broker that revokes every partition being claimed but the
        # meter topic's: the group's answer to a narrower subscription.
        consumer.subscribe([settings.meter_topic], listener=service.listener)
        await wait_until(lambda: _only_topic(consumer, settings.meter_topic), timeout=60)
        gate.set()
        await wait_until(lambda: offsets_reach(db, settings.meter_topic, len(readings)))
        assert not runner.done(), runner.exception()
    finally:
        service.pipeline.stop()
        await runner
        await service.stop()
    meters = await history_keys(db, "meter_history", "meter_id")
    assert sorted(meters) == sorted(expected_history(readings, "meterId"))


def _gated(
    original: Callable[..., Awaitable[Any]], gate: asyncio.Event, at_gate: asyncio.Event
) -> Callable[..., Awaitable[Any]]:
    """The client's own call, once the test opens the gate: a rebalance can happen meanwhile."""

    async def gated(*args: object) -> Any:
        at_gate.set()
        await gate.wait()
        return await original(*args)

    return gated


async def _only_topic(consumer: Any, topic: str) -> bool:
    assignment = consumer.assignment()
    return bool(assignment) and {tp.topic for tp in assignment} == {topic}


async def test_a_write_stuck_on_a_silent_connection_times_out_and_is_retried(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """A connection that stops answering without closing (no RST) does not stall a lane: the
    statement times out (FLEET_DB_COMMAND_TIMEOUT_SECONDS), the connection is dropped and the
    write retried. The stalled statement still reaches the server later; nothing is lost or
    stored twice."""
    proxy = TcpProxy(settings.database_url.get_secret_value())
    await proxy.start()
    settings = settings.model_copy(
        update={"database_url": SecretStr(proxy.dsn), "db_command_timeout_seconds": 1.5}
    )
    readings, messages = stream_with_rejects(meters=20, vehicles=20, rounds=10)
    half = len(messages) // 2
    await publish(settings.kafka_bootstrap_servers, settings.mixed_topic, messages[:half])
    try:
        async with running_service(settings):
            await wait_until(lambda: _offsets_at(db, settings, half))
            retried = REGISTRY.get_sample_value("fleet_sink_retries_total") or 0.0
            proxy.hold()  # what the consumer sends from now on goes nowhere, silently
            await publish(settings.kafka_bootstrap_servers, settings.mixed_topic, messages[half:])
            await wait_until(lambda: _held(proxy))
            await wait_until(lambda: _counter_above("fleet_sink_retries_total", retried), 20)
            proxy.release()
            await wait_until(lambda: _offsets_at(db, settings, len(messages)))
    finally:
        await proxy.cut()
    await assert_exactly_once(db, settings, readings, messages)


async def _counter_above(name: str, value: float) -> bool:
    return (REGISTRY.get_sample_value(name) or 0.0) > value


async def _held(proxy: TcpProxy) -> bool:
    return proxy.held_bytes > 0


def _events(member: ConsumerProcess) -> list[str]:
    lines = member.output().splitlines()
    return [json.loads(line)["event"] for line in lines if line.startswith("{")]


async def _logged(member: ConsumerProcess, event: str, after: str | None = None) -> bool:
    events = _events(member)
    if after is not None:
        events = events[events.index(after) :] if after in events else []
    return event in events
