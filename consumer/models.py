"""The two readings and how a mixed-topic message is told apart. Pure: no I/O.

Field names are the wire names (camelCase), so what a device sends, what the
decoder validates and what the API returns are one vocabulary. Ranges mirror
the CHECK constraints in sql/: anything the models accept, the tables accept.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictFloat,
    StrictStr,
)
from pydantic_core import PydanticCustomError

# Readings are deltas in kWh stored as DECIMAL(10,3): the bound is the largest
# value that still fits once PostgreSQL rounds it to 1 Wh.
MAX_KWH = 9_999_999.999

# A device id is 1-128 visible characters of any script, with spaces (U+0020) only between
# them. Invisible characters are refused: control characters (C0, C1), format characters
# (U+200B zero width space, U+202E right-to-left override, U+FEFF byte order mark, soft
# hyphen, ...), line and paragraph separators, and every space but U+0020 (no-break,
# ideographic, ...) - Unicode 14's Cc, Cf, Zl, Zp and Zs in the Basic Multilingual Plane.
# The decoder, the API and the OpenAPI document share this one pattern (it means the same
# to pydantic's Rust engine, to Python's re and to ECMA-262).
_INVISIBLE = (
    r"\u0000-\u001f\u007f-\u00a0\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2"
    r"\u1680\u180e\u2000-\u200f\u2028-\u202f\u205f-\u2064\u2066-\u206f\u3000\ufeff\ufff9-\ufffb"
)
DEVICE_ID_PATTERN = rf"^[^ {_INVISIBLE}](?:[^{_INVISIBLE}]*[^ {_INVISIBLE}])?$"
DeviceId = Annotated[StrictStr, Field(min_length=1, max_length=128, pattern=DEVICE_ID_PATTERN)]
Kwh = Annotated[StrictFloat, Field(ge=0, le=MAX_KWH, allow_inf_nan=False)]
Percent = Annotated[StrictFloat, Field(ge=0, le=100, allow_inf_nan=False)]
Celsius = Annotated[StrictFloat, Field(ge=-50, le=150, allow_inf_nan=False)]
Volts = Annotated[StrictFloat, Field(ge=0, le=100_000, allow_inf_nan=False)]

EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)


def _iso_string(value: object) -> object:
    """Only an ISO-8601 string is a timestamp; pydantic would also take epoch numbers."""
    if isinstance(value, datetime):
        return value  # built in code, not decoded from JSON
    if not isinstance(value, str):
        raise PydanticCustomError("datetime_type", "timestamp must be an ISO-8601 string")
    if value.strip().lstrip("-").replace(".", "", 1).isdigit():
        raise PydanticCustomError("datetime_parsing", "timestamp must be ISO-8601, not epoch")
    return value


def _representable(value: datetime) -> datetime:
    """Refuse instants PostgreSQL cannot take or no real device sends (before 1970)."""
    try:
        if value.astimezone(UTC) < EARLIEST:
            raise PydanticCustomError("datetime_parsing", "timestamp is before 1970")
    except OverflowError:
        raise PydanticCustomError("datetime_parsing", "timestamp is out of range") from None
    return value


Timestamp = Annotated[AwareDatetime, BeforeValidator(_iso_string), AfterValidator(_representable)]

_READING_CONFIG = ConfigDict(extra="forbid", frozen=True)


class Stream(enum.StrEnum):
    METER = "meter"
    VEHICLE = "vehicle"


class MeterReading(BaseModel):
    model_config = _READING_CONFIG

    meterId: DeviceId
    kwhConsumedAc: Kwh
    voltage: Volts
    timestamp: Timestamp

    @property
    def device_id(self) -> str:
        return self.meterId


class VehicleReading(BaseModel):
    model_config = _READING_CONFIG

    vehicleId: DeviceId
    soc: Percent
    kwhDeliveredDc: Kwh
    batteryTemp: Celsius
    timestamp: Timestamp

    @property
    def device_id(self) -> str:
        return self.vehicleId


Reading = MeterReading | VehicleReading

MODEL_OF: dict[Stream, type[MeterReading] | type[VehicleReading]] = {
    Stream.METER: MeterReading,
    Stream.VEHICLE: VehicleReading,
}


class ShapeError(enum.StrEnum):
    BOTH_IDS = "ambiguous_shape"
    NO_ID = "unknown_shape"


def detect_stream(message: dict[str, Any]) -> Stream | ShapeError:
    """meterId -> meter, vehicleId -> vehicle; both or neither is an error."""
    has_meter = "meterId" in message
    has_vehicle = "vehicleId" in message
    if has_meter and has_vehicle:
        return ShapeError.BOTH_IDS
    if has_meter:
        return Stream.METER
    if has_vehicle:
        return Stream.VEHICLE
    return ShapeError.NO_ID
