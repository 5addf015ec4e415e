"""Bad input is dead-lettered with its own reason; the good messages around it are stored."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import asyncpg
from aiokafka import AIOKafkaConsumer

from consumer.settings import Settings
from devtools.factories import encode, meter, vehicle
from tests.integration.helpers import consume_until_idle, publish

FUTURE = (datetime.now(UTC) + timedelta(days=2)).isoformat()
GOOD_M = meter("m-1", 0)
GOOD_V = vehicle("v-1", 0)


def _with(base: dict[str, object], **changes: object) -> bytes:
    return json.dumps(base | changes).encode()


# (payload, reason) on the mixed topic: one of each class the spec names.
BAD_INPUTS: list[tuple[bytes | None, str]] = [
    (None, "empty_payload"),
    (b"", "empty_payload"),
    (b'{"meterId": "m-1", "x": "' + b"a" * 20_000 + b'"}', "payload_too_large"),
    (b'{"meterId": "m-\xff\xfe"}', "invalid_utf8"),
    (b'{"meterId": "m-1", ', "malformed_json"),
    (
        b'{"meterId": "m-1", "meterId": "m-2", "kwhConsumedAc": 1, "voltage": 230, '
        b'"timestamp": "2026-01-01T00:00:00Z"}',
        "duplicate_key",
    ),
    (
        b'{"meterId": "m-1", "kwhConsumedAc": NaN, "voltage": 230, '
        b'"timestamp": "2026-01-01T00:00:00Z"}',
        "non_finite_number",
    ),
    (_with(GOOD_M, kwhConsumedAc=float("inf")), "non_finite_number"),
    (b"[1, 2, 3]", "not_an_object"),
    (b"null", "not_an_object"),
    (_with(GOOD_M, vehicleId="v-1"), "ambiguous_shape"),
    (b'{"kwhConsumedAc": 1}', "unknown_shape"),
    (_with(GOOD_M, kwhConsumedAc="1.5"), "wrong_type"),
    (_with(GOOD_V, soc=True), "wrong_type"),
    (_with(GOOD_M, kwhConsumedAc=-1), "out_of_range"),
    (_with(GOOD_V, soc=100.5), "out_of_range"),
    (_with(GOOD_V, batteryTemp=400), "out_of_range"),
    (json.dumps({k: v for k, v in GOOD_M.items() if k != "voltage"}).encode(), "missing_field"),
    (_with(GOOD_M, firmware="1.2"), "unknown_field"),
    (_with(GOOD_M, meterId=""), "invalid_device_id"),
    (_with(GOOD_M, timestamp="2026-01-01T00:00:00"), "timestamp_without_offset"),
    (_with(GOOD_M, timestamp="yesterday"), "invalid_timestamp"),
    (_with(GOOD_M, timestamp=FUTURE), "timestamp_in_future"),
]


async def test_each_bad_input_lands_in_dead_letters_with_its_reason(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """Every class of bad input is recorded with its own reason and bytes; good neighbours land."""
    messages: list[tuple[bytes | None, bytes | None]] = []
    for i, (payload, _) in enumerate(BAD_INPUTS):
        messages.append(encode(meter(f"good-m-{i}", i)))
        messages.append((b"bad", payload))
        messages.append(encode(vehicle(f"good-v-{i}", i)))
    await publish(settings.kafka_bootstrap_servers, settings.mixed_topic, messages)

    await consume_until_idle(settings)

    rows = await db.fetch(
        'SELECT reason, payload, topic, "partition", "offset", detail FROM dead_letters'
    )
    assert sorted(r["reason"] for r in rows) == sorted(reason for _, reason in BAD_INPUTS)
    assert sorted(r["payload"] or b"-" for r in rows) == sorted(p or b"-" for p, _ in BAD_INPUTS)
    assert sum(r["payload"] is None for r in rows) == 1  # a null value stays null, b"" stays b""
    assert all(r["topic"] == settings.mixed_topic and r["detail"] for r in rows)
    assert len({(r["partition"], r["offset"]) for r in rows}) == len(BAD_INPUTS)
    assert await db.fetchval("SELECT count(*) FROM meter_history") == len(BAD_INPUTS)
    assert await db.fetchval("SELECT count(*) FROM vehicle_history") == len(BAD_INPUTS)


async def test_wrong_shape_on_a_dedicated_topic_is_rejected_as_wrong_topic(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """A vehicle reading published to the meter topic is dead-lettered, not guessed at."""
    await publish(settings.kafka_bootstrap_servers, settings.meter_topic, [encode(GOOD_V)])
    await consume_until_idle(settings)
    assert await db.fetchval("SELECT reason FROM dead_letters") == "wrong_topic"
    assert await db.fetchval("SELECT count(*) FROM vehicle_history") == 0


async def test_rejects_are_published_to_the_dead_letter_topic_with_their_reason(
    settings: Settings,
) -> None:
    """Operators can tail the dead-letter topic: original bytes plus reason and source headers."""
    await publish(settings.kafka_bootstrap_servers, settings.mixed_topic, [(b"k", b"not json")])
    await consume_until_idle(settings)

    tail = AIOKafkaConsumer(
        settings.dlq_topic,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await tail.start()
    try:
        batches = await tail.getmany(timeout_ms=5000)
    finally:
        await tail.stop()
    records = [r for rs in batches.values() for r in rs]
    assert [r.value for r in records] == [b"not json"]
    headers = dict(records[0].headers)
    assert headers["reason"] == b"malformed_json"
    assert headers["source"].startswith(settings.mixed_topic.encode())
