"""POST /v1/ingestion/telemetry: readings over HTTP, validated like the consumer, produced to Kafka.

The body is one reading or an array of them. It is read by consumer.api.body (bounded
in bytes, time and depth, parsed by the consumer's own parser: UTF-8, duplicate keys,
NaN/Infinity), charged to the client's rate limit by its number of readings, then every item
is shape-detected and validated by the consumer's decoder. Valid items go to
the meter or vehicle topic, keyed by device id, as compact JSON of the item as
sent; the answer is 202 only once the broker has acknowledged every one of them.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from consumer import metrics
from consumer.api.body import read_json
from consumer.api.deps import DEPS
from consumer.api.errors import ApiError, error_body
from consumer.api.security import charge
from consumer.decode import Limits, Reason, Rejection, validate_reading
from consumer.models import MeterReading
from consumer.settings import Settings

log = structlog.get_logger(__name__)

PATH = "/v1/ingestion/telemetry"
_SEND_TIMEOUT_S = 5.0
READINGS_PER_UNIT = 100  # what one rate-limit unit buys


def ingestion_routes() -> list[web.RouteDef]:
    return [web.post(PATH, ingest_telemetry)]


async def ingest_telemetry(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    settings = deps.settings
    items = _items_of(await read_json(request, settings.ingest_max_body_bytes))
    if len(items) > settings.ingest_max_items:
        raise ApiError(
            413,
            "too_many_items",
            f"{len(items)} readings exceeds the limit of {settings.ingest_max_items} per request",
        )
    charge(request, len(items) / READINGS_PER_UNIT)

    messages, rejected = _validate(items, settings)
    metrics.HTTP_INGEST_ITEMS.labels("rejected").inc(len(rejected))
    if not messages:
        message = "no valid reading in the body" if items else "the array is empty"
        payload = error_body("no_valid_readings", message) | {"rejected": rejected}
        return web.json_response(payload, status=400)

    await _produce(deps.require_producer(), messages)
    metrics.HTTP_INGEST_ITEMS.labels("accepted").inc(len(messages))
    log.info("telemetry_ingested", accepted=len(messages), rejected=len(rejected))
    return web.json_response({"accepted": len(messages), "rejected": rejected}, status=202)


def _items_of(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return value
    raise ApiError(
        400, "invalid_body", f"expected a reading or an array of them, got {type(value).__name__}"
    )


def _validate(
    items: list[Any], settings: Settings
) -> tuple[list[tuple[str, bytes, bytes]], list[dict[str, Any]]]:
    """(topic, key, value) per valid item, and {index, reason, detail} per rejected one."""
    now = datetime.now(UTC)
    limits = Limits.from_settings(settings)
    messages: list[tuple[str, bytes, bytes]] = []
    rejected: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        if isinstance(item, dict):
            result = validate_reading(item, None, now=now, limits=limits)
        else:
            result = Rejection(
                Reason.NOT_AN_OBJECT, f"expected a JSON object, got {type(item).__name__}"
            )
        if isinstance(result, Rejection):
            rejected.append(
                {"index": index, "reason": result.reason.value, "detail": result.detail}
            )
            continue
        value = json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode()
        if len(value) > limits.max_payload_bytes:  # the consumer would dead-letter it
            rejected.append(
                {
                    "index": index,
                    "reason": Reason.PAYLOAD_TOO_LARGE.value,
                    "detail": f"{len(value)} bytes exceeds the limit of {limits.max_payload_bytes}",
                }
            )
            continue
        topic = settings.meter_topic if isinstance(result, MeterReading) else settings.vehicle_topic
        messages.append((topic, result.device_id.encode(), value))
    return messages, rejected


async def _produce(producer: AIOKafkaProducer, messages: list[tuple[str, bytes, bytes]]) -> None:
    """Send every message and wait for the broker's acknowledgement of each, or 503."""
    futures: list[asyncio.Future[Any]] = []
    try:
        async with asyncio.timeout(_SEND_TIMEOUT_S):
            for topic, key, value in messages:
                futures.append(await producer.send(topic, value=value, key=key))
            await asyncio.wait(futures)  # waiting does not cancel them on timeout
        for future in futures:
            future.result()  # the first failed send raises here
    except (KafkaError, TimeoutError) as exc:
        for future in futures:
            future.add_done_callback(_retrieve_exception)
        log.warning("telemetry_produce_failed", error=repr(exc), messages=len(messages))
        raise ApiError(
            503, "broker_unavailable", "the broker did not acknowledge the readings; retry"
        ) from exc


def _retrieve_exception(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # marks it retrieved: the caller already got a 503
