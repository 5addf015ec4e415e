"""The two readings and how a mixed-topic message is told apart. Pure: no I/O.

Field names are the wire names (camelCase), so what a device sends, what the
decoder validates and what the API returns are one vocabulary. Ranges mirror
the CHECK constraints in sql/: anything the models accept, the tables accept.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictFloat, StrictStr

# Readings are deltas in kWh stored as DECIMAL(10,3): the bound is the largest
# value that still fits once PostgreSQL rounds it to 1 Wh.
MAX_KWH = 9_999_999.999

DeviceId = Annotated[StrictStr, Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]
Kwh = Annotated[StrictFloat, Field(ge=0, le=MAX_KWH, allow_inf_nan=False)]
Percent = Annotated[StrictFloat, Field(ge=0, le=100, allow_inf_nan=False)]
Celsius = Annotated[StrictFloat, Field(ge=-50, le=150, allow_inf_nan=False)]
Volts = Annotated[StrictFloat, Field(ge=0, le=100_000, allow_inf_nan=False)]

_READING_CONFIG = ConfigDict(extra="forbid", frozen=True)


class Stream(enum.StrEnum):
    METER = "meter"
    VEHICLE = "vehicle"


class MeterReading(BaseModel):
    model_config = _READING_CONFIG

    meterId: DeviceId  # noqa: N815 -- wire name
    kwhConsumedAc: Kwh  # noqa: N815
    voltage: Volts
    timestamp: AwareDatetime

    @property
    def device_id(self) -> str:
        return self.meterId


class VehicleReading(BaseModel):
    model_config = _READING_CONFIG

    vehicleId: DeviceId  # noqa: N815 -- wire name
    soc: Percent
    kwhDeliveredDc: Kwh  # noqa: N815
    batteryTemp: Celsius  # noqa: N815
    timestamp: AwareDatetime

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
