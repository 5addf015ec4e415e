"""Readings for tests, benchmarks and the harness: valid by default, any field changed.

    meter("m-1", 5)                           a valid reading, 5 minutes after BASE_TIME
    meter("m-1", 5, kwhConsumedAc=2.5)        one field replaced (wire names)
    vehicle(soc=MISSING)                      one field left out
    to_json(meter(voltage=float("nan")))      bytes as a device would send them

Every builder here is one of the two wire shapes (consumer.models); what the tests
assert on is computed from the same dicts, so a reading and its expectation cannot
drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from consumer.models import MeterReading, VehicleReading

# Yesterday, to the second: readings of "minute n" are in the past and inside the
# prepared monthly partitions, whatever the day the tests run on.
BASE_TIME = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
MISSING: Any = object()  # a field value that leaves the field out


def at(minute: float) -> str:
    """The ISO-8601 timestamp `minute` minutes after BASE_TIME."""
    return (BASE_TIME + timedelta(minutes=minute)).isoformat()


def _reading(defaults: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (defaults | fields).items() if v is not MISSING}


def meter(device: str = "m-1", minute: float = 0, **fields: Any) -> dict[str, Any]:
    """A valid meter reading of `device`, `minute` minutes after BASE_TIME."""
    defaults = {"meterId": device, "kwhConsumedAc": 1.5, "voltage": 230.0, "timestamp": at(minute)}
    return _reading(defaults, fields)


def vehicle(device: str = "v-1", minute: float = 0, **fields: Any) -> dict[str, Any]:
    """A valid vehicle reading of `device`, `minute` minutes after BASE_TIME."""
    defaults = {
        "vehicleId": device,
        "soc": 50.0,
        "kwhDeliveredDc": 1.2,
        "batteryTemp": 25.0,
        "timestamp": at(minute),
    }
    return _reading(defaults, fields)


def meter_reading(device: str = "m-1", minute: float = 0, **fields: Any) -> MeterReading:
    return MeterReading.model_validate(meter(device, minute, **fields))


def vehicle_reading(device: str = "v-1", minute: float = 0, **fields: Any) -> VehicleReading:
    return VehicleReading.model_validate(vehicle(device, minute, **fields))


def to_json(reading: Any) -> bytes:
    """As a device sends it (NaN and Infinity written as such, as some devices do)."""
    return json.dumps(reading, allow_nan=True).encode()


def encode(reading: dict[str, Any]) -> tuple[bytes, bytes]:
    """(key, value) of the Kafka message: keyed by the device id, as devices publish."""
    key = reading.get("meterId") or reading.get("vehicleId") or "none"
    return str(key).encode(), to_json(reading)


def mixed_fleet(meters: int, vehicles: int, rounds: int) -> list[dict[str, Any]]:
    """Readings of a fleet, round by round (a minute apart); energy values vary by device
    and round, so sums are checkable."""
    out: list[dict[str, Any]] = []
    for r in range(rounds):
        out += [
            meter(f"m-{i}", r, kwhConsumedAc=round(0.1 * (i % 7) + 0.001 * r, 3))
            for i in range(meters)
        ]
        out += [
            vehicle(
                f"v-{i}", r, kwhDeliveredDc=round(0.2 * (i % 5) + 0.001 * r, 3), soc=float(r % 100)
            )
            for i in range(vehicles)
        ]
    return out


def expected_history(readings: Iterable[dict[str, Any]], id_field: str) -> set[tuple[str, str]]:
    """(device, UTC timestamp) of each reading with that id field: what history must hold."""
    return {
        (r[id_field], datetime.fromisoformat(r["timestamp"]).astimezone(UTC).isoformat())
        for r in readings
        if id_field in r
    }
