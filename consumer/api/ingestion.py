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
from consumer.api.contract import (
    ErrorDetail,
    IngestionAccepted,
    IngestionError,
    IngestionRequest,
    RejectedItem,
)
from consumer.api.deps import DEPS
from consumer.api.errors import ApiError
from consumer.api.operation import Answer, Operation, routes_of
from consumer.api.security import charge
from consumer.decode import Limits, Reason, Rejection, validate_reading
from consumer.models import MeterReading
from consumer.settings import Settings

log = structlog.get_logger(__name__)

PATH = "/v1/ingestion/telemetry"
_SEND_TIMEOUT_S = 5.0
READINGS_PER_UNIT = 100  # what one rate-limit unit buys


def ingestion_routes() -> list[web.RouteDef]:
    return routes_of([OPERATION])


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
        error = ErrorDetail(code="no_valid_readings", message=message)
        return web.json_response(IngestionError(error=error, rejected=rejected).body(), status=400)

    await _produce(deps.require_producer(), messages)
    metrics.HTTP_INGEST_ITEMS.labels("accepted").inc(len(messages))
    log.info("telemetry_ingested", accepted=len(messages), rejected=len(rejected))
    accepted = IngestionAccepted(accepted=len(messages), rejected=rejected)
    return web.json_response(accepted.body(), status=202)


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
) -> tuple[list[tuple[str, bytes, bytes]], list[RejectedItem]]:
    """(topic, key, value) per valid item, and why each rejected one was refused."""
    now = datetime.now(UTC)
    limits = Limits.from_settings(settings)
    messages: list[tuple[str, bytes, bytes]] = []
    rejected: list[RejectedItem] = []
    for index, item in enumerate(items):
        if isinstance(item, dict):
            result = validate_reading(item, None, now=now, limits=limits)
        else:
            result = Rejection(
                Reason.NOT_AN_OBJECT, f"expected a JSON object, got {type(item).__name__}"
            )
        if isinstance(result, Rejection):
            rejected.append(
                RejectedItem(index=index, reason=result.reason.value, detail=result.detail)
            )
            continue
        value = json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode()
        if len(value) > limits.max_payload_bytes:  # the consumer would dead-letter it
            detail = f"{len(value)} bytes exceeds the limit of {limits.max_payload_bytes}"
            rejected.append(
                RejectedItem(index=index, reason=Reason.PAYLOAD_TOO_LARGE.value, detail=detail)
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


OPERATION = Operation(
    "POST",
    PATH,
    "ingestTelemetry",
    "Validate readings like the consumer does and produce the valid ones to Kafka",
    ingest_telemetry,
    {
        202: Answer(
            "The broker acknowledged every accepted reading; rejected ones are listed by index.",
            IngestionAccepted,
        ),
        400: Answer(
            "malformed_json (not JSON, not UTF-8, duplicate keys, NaN/Infinity), invalid_body "
            "(neither an object nor an array), no_valid_readings (with the rejected list).",
            IngestionError,
        ),
        413: Answer("payload_too_large (body over the byte limit), too_many_items."),
        415: Answer("unsupported_media_type: Content-Type must be application/json."),
        503: Answer("broker_unavailable: nothing was acknowledged in time; retry."),
    },
    body=IngestionRequest,
    validate_body=False,  # item by item, by the consumer's own decoder
)
