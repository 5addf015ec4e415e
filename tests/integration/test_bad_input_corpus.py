"""A corpus of malformed messages, through Kafka and through the HTTP ingestion endpoint.

Every case names the reason the consumer records in dead_letters, and what the HTTP
endpoint answers for the same bytes: the item's reason (400 no_valid_readings), or a
body-level code when the bytes are not one JSON value (malformed_json) or not an
object or array (invalid_body).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaProducer

from consumer.api.app import make_app
from consumer.api.deps import ApiDeps
from consumer.api.ingestion import PATH, ingestion_routes
from consumer.settings import Settings
from devtools.factories import MISSING, encode, meter, to_json, vehicle
from tests.integration.helpers import consume_until_idle

M = meter("m-1", 0)
V = vehicle("v-1", 0)
FUTURE = (datetime.now(UTC) + timedelta(days=1)).isoformat()
ITEM = "item"  # HTTP answers with the item's own reason


@dataclass(frozen=True)
class Case:
    name: str
    payload: bytes | None
    reason: str  # in dead_letters
    http: str  # ITEM, or the body-level error code


def j(base: dict[str, Any], **changes: Any) -> bytes:
    """The base reading as JSON, some fields changed (MISSING: left out)."""
    return to_json({k: v for k, v in (base | changes).items() if v is not MISSING})


def without(base: dict[str, Any], field: str) -> bytes:
    return j(base, **{field: MISSING})


CASES = [
    Case("null value", None, "empty_payload", ""),
    Case("empty value", b"", "empty_payload", "malformed_json"),
    Case("whitespace", b"   ", "malformed_json", "malformed_json"),
    Case("lone brace", b"{", "malformed_json", "malformed_json"),
    Case("truncated", j(M)[:-5], "malformed_json", "malformed_json"),
    Case("trailing garbage", j(M) + b"x", "malformed_json", "malformed_json"),
    Case("single quotes", b"{'meterId': 'm-1'}", "malformed_json", "malformed_json"),
    Case("non-UTF-8", b'{"meterId": "m-\xff"}', "invalid_utf8", "malformed_json"),
    Case("UTF-8 BOM", b"\xef\xbb\xbf" + j(M), "malformed_json", "malformed_json"),
    Case("duplicate key", j(M)[:-1] + b', "meterId": "m-2"}', "duplicate_key", "malformed_json"),
    Case("NaN literal", j(M).replace(b"1.5", b"NaN"), "non_finite_number", "malformed_json"),
    Case(
        "Infinity literal", j(M).replace(b"1.5", b"Infinity"), "non_finite_number", "malformed_json"
    ),
    Case(
        "-Infinity literal",
        j(M).replace(b"1.5", b"-Infinity"),
        "non_finite_number",
        "malformed_json",
    ),
    Case("1e400", j(M).replace(b"1.5", b"1e400"), "non_finite_number", ITEM),
    Case(
        "5000-digit integer", j(M).replace(b"1.5", b"9" * 5000), "malformed_json", "malformed_json"
    ),
    Case("huge integer", j(M).replace(b"1.5", b"1" + b"0" * 400), "wrong_type", ITEM),
    Case("JSON string", b'"hello"', "not_an_object", "invalid_body"),
    Case("JSON number", b"42", "not_an_object", "invalid_body"),
    Case("JSON null", b"null", "not_an_object", "invalid_body"),
    Case("JSON boolean", b"true", "not_an_object", "invalid_body"),
    Case("array of numbers", b"[1, 2]", "not_an_object", ITEM),
    Case("both ids", j(M, vehicleId="v-1"), "ambiguous_shape", ITEM),
    Case("neither id", without(M, "meterId"), "unknown_shape", ITEM),
    Case("number as string", j(M, kwhConsumedAc="1.5"), "wrong_type", ITEM),
    Case("boolean as number", j(V, soc=True), "wrong_type", ITEM),
    Case("null as number", j(M, voltage=None), "wrong_type", ITEM),
    Case("nested object", j(M, kwhConsumedAc={"value": 1.5}), "wrong_type", ITEM),
    Case("array as number", j(V, kwhDeliveredDc=[1.2]), "wrong_type", ITEM),
    Case("number as id", j(M, meterId=17), "wrong_type", ITEM),
    Case("negative energy", j(M, kwhConsumedAc=-0.001), "out_of_range", ITEM),
    Case("energy past DECIMAL(10,3)", j(V, kwhDeliveredDc=10_000_000), "out_of_range", ITEM),
    Case("soc above 100", j(V, soc=100.01), "out_of_range", ITEM),
    Case("soc below 0", j(V, soc=-0.01), "out_of_range", ITEM),
    Case("battery too cold", j(V, batteryTemp=-50.01), "out_of_range", ITEM),
    Case("battery too hot", j(V, batteryTemp=150.01), "out_of_range", ITEM),
    Case("negative voltage", j(M, voltage=-1), "out_of_range", ITEM),
    Case("voltage too high", j(M, voltage=100_001), "out_of_range", ITEM),
    Case("missing timestamp", without(V, "timestamp"), "missing_field", ITEM),
    Case("missing soc", without(V, "soc"), "missing_field", ITEM),
    Case("unknown field", j(M, firmware="1.2.3"), "unknown_field", ITEM),
    Case("empty id", j(M, meterId=""), "invalid_device_id", ITEM),
    Case("129-character id", j(M, meterId="m" * 129), "invalid_device_id", ITEM),
    Case("control character in id", j(M, meterId="m\u0001"), "invalid_device_id", ITEM),
    Case("newline in id", j(V, vehicleId="v\n1"), "invalid_device_id", ITEM),
    Case("zero width space in id", j(M, meterId="m\u200b1"), "invalid_device_id", ITEM),
    Case("right-to-left override in id", j(V, vehicleId="v\u202e1"), "invalid_device_id", ITEM),
    Case("byte order mark in id", j(M, meterId="\ufeffm-1"), "invalid_device_id", ITEM),
    Case("a lone space as id", j(M, meterId=" "), "invalid_device_id", ITEM),
    Case("leading space in id", j(V, vehicleId=" v-1"), "invalid_device_id", ITEM),
    Case(
        "naive timestamp", j(M, timestamp="2026-11-01T10:00:00"), "timestamp_without_offset", ITEM
    ),
    Case("date only", j(M, timestamp="2026-11-01"), "timestamp_without_offset", ITEM),
    Case("epoch seconds", j(M, timestamp=1_700_000_000), "wrong_type", ITEM),
    Case("epoch as string", j(M, timestamp="1700000000"), "invalid_timestamp", ITEM),
    Case("words as timestamp", j(M, timestamp="yesterday"), "invalid_timestamp", ITEM),
    Case("before 1970", j(M, timestamp="1969-12-31T23:59:59Z"), "invalid_timestamp", ITEM),
    Case("far future", j(M, timestamp=FUTURE), "timestamp_in_future", ITEM),
    Case("oversize", j(M, pad="x" * 20_000), "payload_too_large", "unknown_field"),
]


async def test_corpus_through_kafka_each_case_lands_with_its_reason(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """Each malformed message is one dead letter with its expected reason, and the good
    readings published between them are all stored."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
    await producer.start()
    expected: dict[tuple[int, int], str] = {}
    try:
        for i, case in enumerate(CASES):
            await producer.send_and_wait(
                settings.mixed_topic, value=encode(meter(f"good-{i}", i))[1]
            )
            sent = await producer.send_and_wait(
                settings.mixed_topic, value=case.payload, key=b"bad"
            )
            expected[(sent.partition, sent.offset)] = case.reason
    finally:
        await producer.stop()

    await consume_until_idle(settings)

    rows = await db.fetch('SELECT "partition", "offset", reason FROM dead_letters')
    assert {(r["partition"], r["offset"]): r["reason"] for r in rows} == expected
    assert await db.fetchval("SELECT count(*) FROM meter_history") == len(CASES)


async def test_corpus_through_http_each_case_is_refused_with_its_reason(settings: Settings) -> None:
    """Posted on its own, each malformed body is refused (400, or 413 past the body limit)
    with the same reason the consumer gives, and nothing is produced."""
    app = make_app(
        {}, deps=ApiDeps(settings), routes=ingestion_routes()
    )  # no producer: nothing may be sent
    async with TestClient(TestServer(app)) as client:
        for case in CASES:
            if case.payload is None:
                continue  # a Kafka tombstone has no HTTP equivalent
            resp = await client.post(
                PATH, data=case.payload, headers={"Content-Type": "application/json"}
            )
            body = await resp.json()
            assert resp.status == 400, (case.name, body)
            if case.http == ITEM:
                assert body["error"]["code"] == "no_valid_readings", case.name
                assert {r["reason"] for r in body["rejected"]} == {case.reason}, (case.name, body)
            elif case.http in ("malformed_json", "invalid_body"):
                assert body["error"]["code"] == case.http, (case.name, body)
            else:
                assert [r["reason"] for r in body["rejected"]] == [case.http], (case.name, body)
    assert len(CASES) >= 40
