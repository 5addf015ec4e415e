"""POST /v1/ingestion/telemetry over a real socket, a real broker and, behind it, the real consumer."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaProducer

from consumer.api.app import make_app
from consumer.api.deps import ApiDeps
from consumer.api.ingestion import PATH, ingestion_routes
from consumer.api.openapi import openapi_routes
from consumer.api.security import security_middlewares
from consumer.kafka import ensure_topics, make_producer
from consumer.settings import Settings
from devtools.factories import meter, vehicle
from devtools.stack import start_broker
from tests.conftest import ARTIFACTS, wait_until
from tests.integration.helpers import as_key, consume_until_idle

FUTURE = (datetime.now(UTC) + timedelta(days=2)).isoformat()


async def serve(settings: Settings, producer: AIOKafkaProducer | None) -> TestClient[Any, Any]:
    """The ingestion API as the service composes it, listening on a free local port."""
    app = make_app(
        {},
        deps=ApiDeps(settings, producer=producer),
        routes=ingestion_routes() + openapi_routes(),
        middlewares=security_middlewares(settings),
    )
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


@pytest.fixture
async def client(
    settings: Settings, producer: AIOKafkaProducer
) -> AsyncIterator[TestClient[Any, Any]]:
    api = await serve(settings, producer)
    yield api
    await api.close()


async def post_json(client: TestClient[Any, Any], body: Any) -> ClientResponse:
    return await client.post(PATH, json=body)


async def post_raw(
    client: TestClient[Any, Any], data: bytes, content_type: str = "application/json"
) -> ClientResponse:
    return await client.post(PATH, data=data, headers={"Content-Type": content_type})


async def error_code(response: ClientResponse) -> str:
    body = await response.json()
    code: str = body["error"]["code"]
    return code


async def test_one_reading_is_acknowledged_and_stored_by_the_consumer(
    client: TestClient[Any, Any], settings: Settings, db: asyncpg.Connection
) -> None:
    """A single valid reading gets 202 and reaches meter_history through Kafka and the consumer."""
    reading = meter("m-http-1", 0, kwhConsumedAc=2.5)
    response = await post_json(client, reading)
    assert response.status == 202
    assert await response.json() == {"accepted": 1, "rejected": []}

    await consume_until_idle(settings)
    rows = await db.fetch("SELECT meter_id, kwh_consumed_ac, timestamp FROM meter_history")
    assert [as_key(r["meter_id"], r["timestamp"]) for r in rows] == [
        as_key("m-http-1", datetime.fromisoformat(reading["timestamp"]))
    ]
    assert float(rows[0]["kwh_consumed_ac"]) == 2.5


async def test_array_stores_valid_items_and_reports_each_invalid_one_by_index(
    client: TestClient[Any, Any], settings: Settings, db: asyncpg.Connection
) -> None:
    """An array is accepted in part: valid items are stored, invalid ones come back with reasons."""
    good_meter, good_vehicle = meter("m-http-2", 1), vehicle("v-http-2", 1)
    items: list[Any] = [
        good_meter,
        meter("m-bad", 2, kwhConsumedAc=-1.0),
        good_vehicle,
        {"kwhConsumedAc": 1.0},
        42,
        good_meter | {"vehicleId": "v-1"},
        good_vehicle | {"firmware": "1.2"},
        good_vehicle | {"timestamp": FUTURE},
        good_meter | {"meterId": ""},
    ]
    response = await post_json(client, items)
    assert response.status == 202
    body = await response.json()
    assert body["accepted"] == 2
    assert [(r["index"], r["reason"]) for r in body["rejected"]] == [
        (1, "out_of_range"),
        (3, "unknown_shape"),
        (4, "not_an_object"),
        (5, "ambiguous_shape"),
        (6, "unknown_field"),
        (7, "timestamp_in_future"),
        (8, "invalid_device_id"),
    ]
    assert all(r["detail"] for r in body["rejected"])

    await consume_until_idle(settings)
    assert await db.fetchval("SELECT meter_id FROM meter_history") == "m-http-2"
    assert await db.fetchval("SELECT count(*) FROM meter_history") == 1
    assert await db.fetchval("SELECT vehicle_id FROM vehicle_history") == "v-http-2"
    assert await db.fetchval("SELECT count(*) FROM vehicle_history") == 1
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0  # never produced


@pytest.mark.parametrize(
    "data",
    [
        b'{"meterId": "m-1", ',
        b"",
        b'{"meterId": "m-\xff"}',
        b'{"meterId": "m-1", "meterId": "m-2"}',
        b'[{"meterId": "m-1", "kwhConsumedAc": NaN}]',
        b"[1] 2",
        b'1, "x": 2',
    ],
    ids=["truncated", "empty", "not-utf8", "duplicate-key", "nan", "two-values", "not-one-value"],
)
async def test_unparseable_body_is_refused_whole_as_malformed_json(
    client: TestClient[Any, Any], data: bytes
) -> None:
    """A body that is not one clean UTF-8 JSON value (no duplicate keys, no NaN) gets 400 malformed_json."""
    response = await post_raw(client, data)
    assert response.status == 400
    assert await error_code(response) == "malformed_json"


async def test_nothing_valid_is_400_with_the_reasons(client: TestClient[Any, Any]) -> None:
    """When no item is valid the answer is 400 no_valid_readings, still listing every reason."""
    response = await post_json(client, [meter("m-1", 0, kwhConsumedAc=-1.0), {"soc": 1}])
    assert response.status == 400
    body = await response.json()
    assert body["error"]["code"] == "no_valid_readings"
    assert [(r["index"], r["reason"]) for r in body["rejected"]] == [
        (0, "out_of_range"),
        (1, "unknown_shape"),
    ]
    empty = await post_json(client, [])
    assert empty.status == 400
    assert await empty.json() == {
        "error": {"code": "no_valid_readings", "message": "the array is empty"},
        "rejected": [],
    }


@pytest.mark.parametrize("body", [42, "reading", None, True], ids=["int", "str", "null", "bool"])
async def test_body_that_is_neither_object_nor_array_is_invalid_body(
    client: TestClient[Any, Any], body: Any
) -> None:
    """A JSON scalar is neither a reading nor an array of them: 400 invalid_body."""
    response = await post_raw(client, json.dumps(body).encode())
    assert response.status == 400
    assert await error_code(response) == "invalid_body"


async def test_body_over_the_byte_limit_is_413_by_header_and_by_bytes_read(
    settings: Settings, producer: AIOKafkaProducer
) -> None:
    """A body over ingest_max_body_bytes gets 413, announced by Content-Length or only streamed."""
    small = settings.model_copy(update={"ingest_max_body_bytes": 1024})
    api = await serve(small, producer)
    data = json.dumps([meter("m-1", i) for i in range(20)]).encode()
    assert len(data) > 1024

    async def chunks() -> AsyncIterator[bytes]:  # chunked: no Content-Length to go by
        for start in range(0, len(data), 256):
            yield data[start : start + 256]

    try:
        declared = await post_raw(api, data)
        assert declared.status == 413
        assert await error_code(declared) == "payload_too_large"
        streamed = await api.post(PATH, data=chunks(), headers={"Content-Type": "application/json"})
        assert streamed.status == 413
        assert await error_code(streamed) == "payload_too_large"
    finally:
        await api.close()


async def test_more_items_than_allowed_is_413_too_many_items(
    settings: Settings, producer: AIOKafkaProducer
) -> None:
    """An array longer than ingest_max_items gets 413 too_many_items."""
    api = await serve(settings.model_copy(update={"ingest_max_items": 3}), producer)
    try:
        response = await post_json(api, [meter("m-1", i) for i in range(4)])
        assert response.status == 413
        assert await error_code(response) == "too_many_items"
        assert (await post_json(api, [meter("m-1", i) for i in range(3)])).status == 202
    finally:
        await api.close()


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
async def test_body_that_is_not_declared_json_is_415(
    client: TestClient[Any, Any], content_type: str
) -> None:
    """Only Content-Type application/json is taken: anything else gets 415 unsupported_media_type."""
    response = await post_raw(client, json.dumps(meter("m-1", 0)).encode(), content_type)
    assert response.status == 415
    assert await error_code(response) == "unsupported_media_type"


async def test_without_a_producer_valid_readings_get_503(settings: Settings) -> None:
    """Before the producer is up (or when it could not start), valid readings get 503 broker_unavailable."""
    api = await serve(settings, None)
    try:
        response = await post_json(api, meter("m-1", 0))
        assert response.status == 503
        assert await error_code(response) == "broker_unavailable"
    finally:
        await api.close()


async def test_when_the_broker_goes_away_readings_get_503_until_it_is_back(
    settings: Settings,
) -> None:
    """A stopped broker acknowledges nothing: 503 broker_unavailable in bounded time, 202 once it is back."""
    broker = start_broker(ARTIFACTS)
    lonely = settings.model_copy(update={"kafka_bootstrap_servers": broker.bootstrap_servers})
    try:
        await ensure_topics(broker.bootstrap_servers, [settings.meter_topic], partitions=1)
        producer = make_producer(lonely)
        await producer.start()
        api = await serve(lonely, producer)
        try:
            assert (await post_json(api, meter("m-1", 0))).status == 202
            broker.stop()
            response = await post_json(api, meter("m-1", 1))
            assert response.status == 503
            assert await error_code(response) == "broker_unavailable"

            broker = start_broker(ARTIFACTS, port=broker.port)  # empty: tansu keeps nothing
            await ensure_topics(broker.bootstrap_servers, [settings.meter_topic], partitions=1)

            async def accepted() -> bool:
                return (await post_json(api, meter("m-1", 2))).status == 202

            await wait_until(accepted, timeout=30)
        finally:
            await api.close()
            await producer.stop()
    finally:
        broker.stop()
