"""Producers that compress: every codec Kafka defines, from aiokafka and from librdkafka
(the client most devices and gateways use), and a record batch nobody can decode."""

from __future__ import annotations

import asyncio
import signal
import struct
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.record._crc32c import crc as crc32c
from aiokafka.record.default_records import DefaultRecordBase, DefaultRecordBatchBuilder

from consumer.settings import Settings
from devtools.factories import encode, expected_history, meter, vehicle
from devtools.processes import ConsumerProcess
from tests.conftest import wait_until
from tests.integration.helpers import (
    consume_until_idle,
    history_keys,
    publish_to_partition,
    stored_offsets,
)
from tests.integration.processes import consumer_process

CODECS = ("gzip", "snappy", "lz4", "zstd")


def readings_for(codec: str, client: str) -> dict[str, list[dict[str, Any]]]:
    """Per topic kind, readings whose device ids name the codec, client and keying."""
    out: dict[str, list[dict[str, Any]]] = {"meter": [], "vehicle": [], "mixed": []}
    for keyed in ("keyed", "unkeyed"):
        tag = f"{client}-{codec}-{keyed}"
        out["meter"] += [meter(f"m-{tag}-{i}", i) for i in range(20)]
        out["vehicle"] += [vehicle(f"v-{tag}-{i}", i) for i in range(20)]
        out["mixed"] += [meter(f"mm-{tag}-{i}", i) for i in range(10)]
        out["mixed"] += [vehicle(f"mv-{tag}-{i}", i) for i in range(10)]
    return out


def messages(readings: Sequence[dict[str, Any]]) -> list[tuple[bytes | None, bytes]]:
    """Half of each list keyed by device id, the other half without a key."""
    return [
        (key if "-keyed-" in value.decode() else None, value)
        for key, value in (encode(r) for r in readings)
    ]


async def publish_with_aiokafka(bootstrap: str, topic: str, codec: str, msgs: list) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, compression_type=codec, linger_ms=20)
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(topic, key=k, value=v) for k, v in msgs])
    finally:
        await producer.stop()


def publish_with_librdkafka(bootstrap: str, topic: str, codec: str, msgs: list) -> None:
    import confluent_kafka  # noqa: PLC0415 -- a dev extra, needed here only

    failures: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    producer = confluent_kafka.Producer(
        {
            "bootstrap.servers": bootstrap,
            "compression.type": codec,
            "linger.ms": 20,
            "enable.idempotence": False,  # tansu has no InitProducerId
            "acks": "all",
            "log_level": 3,
        }
    )
    for key, value in msgs:
        producer.produce(topic, key=key, value=value, on_delivery=delivered)
    assert producer.flush(30) == 0, "librdkafka did not deliver everything"
    assert not failures, failures


@pytest.mark.parametrize("client", ["aiokafka", "librdkafka"])
async def test_batches_compressed_with_every_codec_land_exactly_once(
    client: str, settings: Settings, db: asyncpg.Connection
) -> None:
    """gzip, snappy, lz4 and zstd batches, keyed and unkeyed, on the meter, vehicle and mixed
    topics: every reading is stored once, in the right table."""
    bootstrap = settings.kafka_bootstrap_servers
    topic_of = {
        "meter": settings.meter_topic,
        "vehicle": settings.vehicle_topic,
        "mixed": settings.mixed_topic,
    }
    sent: list[dict[str, Any]] = []
    for codec in CODECS:
        for kind, readings in readings_for(codec, client).items():
            msgs = messages(readings)
            if client == "aiokafka":
                await publish_with_aiokafka(bootstrap, topic_of[kind], codec, msgs)
            else:
                await asyncio.to_thread(
                    publish_with_librdkafka, bootstrap, topic_of[kind], codec, msgs
                )
            sent += readings

    await consume_until_idle(settings)

    meters = await history_keys(db, "meter_history", "meter_id")
    vehicles = await history_keys(db, "vehicle_history", "vehicle_id")
    assert sorted(meters) == sorted(expected_history(sent, "meterId"))
    assert sorted(vehicles) == sorted(expected_history(sent, "vehicleId"))
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0


def undecodable_batch(values: Sequence[bytes]) -> bytes:
    """A record batch whose header says zstd and whose body is not: its CRC is right (the
    broker stores it as it is), but no client can decompress it."""
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=False,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    now_ms = int(time.time() * 1000)
    for i, value in enumerate(values):
        builder.append(i, timestamp=now_ms, key=b"m-bad", value=value, headers=[])
    raw = bytearray(builder.build())
    at = DefaultRecordBase.ATTRIBUTES_OFFSET
    (attributes,) = struct.unpack_from(">h", raw, at)
    struct.pack_into(">h", raw, at, (attributes & ~0x07) | DefaultRecordBase.CODEC_ZSTD)
    struct.pack_into(">I", raw, DefaultRecordBase.CRC_OFFSET, crc32c(bytes(raw[at:])))
    return bytes(raw)


async def produce_raw_batch(bootstrap: str, tp: TopicPartition, batch: bytes) -> int:
    """Send one record batch as it is; the offset the broker gave it."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.client.force_metadata_update()
        node = producer.client.cluster.leader_for_partition(tp)
        request = ProduceRequest(
            required_acks=-1,
            timeout=10_000,
            topics=[(tp.topic, [(tp.partition, batch)])],
            transactional_id=None,
        )
        response = await producer.client.send(node, request)
    finally:
        await producer.stop()
    ((_, ((_, error, offset, *_),)),) = response.topics
    assert error == 0, f"the broker refused the batch: error {error}"
    return int(offset)


async def halted_gauge(port: int, topic: str) -> float | None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(f'fleet_partitions_halted{{topic="{topic}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_a_batch_no_client_can_decode_halts_its_partition_there_and_nothing_else(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """A corrupt compressed batch on one partition: one clear error naming topic, partition
    and offset, no traceback; the readings before it and every other partition (also after
    it) are stored; a restarted consumer stops at the same place with the same one error."""
    bootstrap, topic = settings.kafka_bootstrap_servers, settings.mixed_topic
    bad_tp = TopicPartition(topic, 1)
    before = {p: [meter(f"m-{p}", i) for i in range(5)] for p in range(4)}
    after = {p: [meter(f"m-{p}", i) for i in range(5, 10)] for p in range(4)}
    for partition, readings in before.items():
        await publish_to_partition(bootstrap, topic, partition, readings)
    bad_offset = await produce_raw_batch(
        bootstrap, bad_tp, undecodable_batch([b'{"never": "read"}'] * 3)
    )
    for partition, readings in after.items():
        await publish_to_partition(bootstrap, topic, partition, readings)
    bad_end = bad_offset + 3 + len(after[1])

    for run in ("first", "restarted"):
        member = consumer_process(settings, run)
        try:
            # Everything but the bad partition's tail: 4 x 10 readings less its 5 after.
            await wait_until(lambda: stored_offsets(db, topic), timeout=60)
            await wait_until(lambda: _history_at(db, 35), timeout=60)
            await wait_until(lambda m=member: _logged(m, "partition_halted"), timeout=30)
            assert await halted_gauge(member.http_port, topic) == 1
            await asyncio.sleep(1)  # nothing further happens: no retry loop, no crash
            assert member.process.poll() is None, member.output()
        finally:
            member.signal(signal.SIGTERM)
            assert await member.wait() == 0, member.output()
        (halted,) = member.events("partition_halted")
        assert (halted["topic"], halted["partition"], halted["offset"]) == (topic, 1, bad_offset)
        assert "zstd" in halted["error"].lower() or "Decompression" in halted["error"]
        assert "Traceback" not in member.output()

    stored = dict(
        await db.fetch(
            'SELECT "partition", next_offset FROM consumer_offsets WHERE topic = $1', topic
        )
    )
    assert stored[1] == bad_offset < bad_end
    assert all(stored[p] == 10 for p in (0, 2, 3))
    devices = await db.fetch("SELECT meter_id, count(*) FROM meter_history GROUP BY 1")
    assert dict(devices) == {"m-0": 10, "m-1": 5, "m-2": 10, "m-3": 10}


async def _logged(member: ConsumerProcess, event: str) -> bool:
    return bool(member.events(event))


async def _history_at(db: asyncpg.Connection, n: int) -> bool:
    return await db.fetchval("SELECT count(*) FROM meter_history") >= n
