"""The HTTP API's contract as pydantic models: what each endpoint takes and answers.

Requests (path, query, body) are validated with these models and responses are
serialised from them; consumer.api.openapi turns the same models into the OpenAPI
document, so the three cannot drift apart. Fields are snake_case in Python and
camelCase on the wire. A field that can be refused carries an `Invalid` marker:
the stable error code and message a client gets when it is wrong.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeVar
from uuid import UUID

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    RootModel,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
)
from pydantic.alias_generators import to_camel

from consumer.alerts import Kind as AlertKind
from consumer.api.errors import ApiError
from consumer.models import DeviceId, Reading, Timestamp

# The examples name one vehicle and its charger's meter throughout the document.
EXAMPLE_VEHICLE = "ev-0001"
EXAMPLE_METER = "meter-0001"
EXAMPLE_SESSION = "3f2b7c1e-8d4a-4b6f-9c2e-1a5d7e9b0c11"
EXAMPLE_ALERT = "a1e27c0d-5b8f-4e3a-9d6c-2f4b8a0e7d15"


@dataclass(frozen=True)
class Invalid:
    """Field metadata: the 400 a client gets when this field is missing or wrong."""

    code: str
    message: str


def invalid_id(name: str) -> Invalid:
    return Invalid(
        f"invalid_{re.sub(r'(?<!^)(?=[A-Z])', '_', name).lower()}",
        f"{name} must be 1-128 visible characters (letters, digits, punctuation, symbols; "
        "spaces only between them)",
    )


def invalid_instant(name: str) -> Invalid:
    return Invalid(
        f"invalid_{name}",
        f"{name} must be an ISO-8601 timestamp with an offset, e.g. 2026-01-31T10:00:00Z",
    )


INVALID_BODY = "invalid_body"
Model = TypeVar("Model", bound=BaseModel)


def parse(model: type[Model], data: Any) -> Model:
    """Validate data into model, or the ApiError(400) its first wrong field names.

    An unknown field or a body that is not an object is invalid_body; otherwise the
    fields are checked in the order the model declares them.
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
        if unknown:
            raise ApiError(400, INVALID_BODY, f"unknown fields: {', '.join(unknown)}") from None
        for error in errors:
            marker = _marker(model, error["loc"])
            if marker is not None:
                raise ApiError(400, marker.code, marker.message) from None
        raise ApiError(400, INVALID_BODY, "body must be a JSON object") from None


def _marker(model: type[BaseModel], loc: tuple[int | str, ...]) -> Invalid | None:
    if not loc:
        return None
    for name, field in model.model_fields.items():
        if loc[0] in (name, field.alias):
            return next((m for m in field.metadata if isinstance(m, Invalid)), None)
    return None


def invalid_markers(model: type[BaseModel]) -> list[Invalid]:
    """Every Invalid a model can raise, in field order (for the document's 400s)."""
    found = [m for f in model.model_fields.values() for m in f.metadata if isinstance(m, Invalid)]
    return list(dict.fromkeys(found))


def _utc_iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


# An instant as the API answers it: ISO-8601 in UTC, "+00:00".
UtcInstant = Annotated[
    AwareDatetime,
    PlainSerializer(_utc_iso, return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]

# An unencoded "+" in a query string arrives as a space: "...10:00:00 01:00".
_SPACED_OFFSET = re.compile(r"(?<=\d) (\d{2}(?::?\d{2})?)$")


def _restore_plus(value: object) -> object:
    return _SPACED_OFFSET.sub(r"+\1", value) if isinstance(value, str) else value


QueryInstant = Annotated[Timestamp, BeforeValidator(_restore_plus)]


def _wire_name(name: str) -> str:
    """snake_case -> camelCase; a trailing "_" (from_, a Python keyword) is dropped."""
    return to_camel(name.rstrip("_"))


def _digits_only(value: object) -> object:
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("not a decimal integer")
    return value


PageSize = Annotated[int, BeforeValidator(_digits_only), Field(ge=1, le=1000)]


class ApiModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=_wire_name,
        validate_by_name=True,
        extra="forbid",
        frozen=True,
        # An answer always carries every field, null or not: the document says so.
        json_schema_serialization_defaults_required=True,
    )

    def body(self) -> dict[str, Any]:
        """The body to send: camelCase, instants in UTC, nulls kept."""
        return self.model_dump(mode="json", by_alias=True)


class QueryModel(ApiModel):
    # A query string may carry what a proxy or a cache-buster adds: unknown names are ignored.
    model_config = ConfigDict(extra="ignore")


class EfficiencyStatus(enum.StrEnum):
    """Where a charging efficiency ratio falls (thresholds: consumer.settings)."""

    NORMAL = "normal"
    FAULT = "fault"
    ANOMALOUS = "anomalous"
    INSUFFICIENT_DATA = "insufficient_data"
    UNLINKED = "unlinked"


# --- requests -------------------------------------------------------------------------------


class VehiclePath(ApiModel):
    vehicle_id: Annotated[DeviceId, invalid_id("vehicleId")] = Field(
        description="The vehicle's id.", examples=[EXAMPLE_VEHICLE]
    )

    @property
    def device_id(self) -> str:
        return self.vehicle_id


class MeterPath(ApiModel):
    meter_id: Annotated[DeviceId, invalid_id("meterId")] = Field(
        description="The meter's id.", examples=[EXAMPLE_METER]
    )

    @property
    def device_id(self) -> str:
        return self.meter_id


class WindowQuery(QueryModel):
    """[from, to): the handler fills a missing `to` with now, a missing `from` with the default span."""

    to: Annotated[QueryInstant | None, invalid_instant("to")] = Field(
        default=None, description="Window end, ISO-8601 with offset (default: now)."
    )
    from_: Annotated[QueryInstant | None, invalid_instant("from")] = Field(
        default=None,
        description="Window start, ISO-8601 with offset (default: `to` minus the default window).",
    )


class PerformanceQuery(WindowQuery):
    meter_id: Annotated[DeviceId | None, invalid_id("meterId")] = Field(
        default=None, description="The charger's meter (default: the assignment table)."
    )


class FleetQuery(WindowQuery):
    status: Annotated[
        EfficiencyStatus | None,
        Invalid("invalid_status", f"status must be one of {', '.join(EfficiencyStatus)}"),
    ] = Field(default=None, description="Only vehicles with this status.")
    limit: Annotated[
        PageSize | None, Invalid("invalid_limit", "limit must be an integer from 1 to 1000")
    ] = Field(default=None, description="Page size (default: FLEET_REPORT_PAGE_SIZE).")
    cursor: Annotated[
        str | None, Invalid("invalid_cursor", "cursor is not one this API returned")
    ] = Field(default=None, description="nextCursor of the previous page; it pins the window.")


class AssignmentRequest(ApiModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"meterId": EXAMPLE_METER, "from": "2026-01-01T00:00:00Z"}]}
    )

    meter_id: Annotated[DeviceId, invalid_id("meterId")]
    from_: Annotated[Timestamp, invalid_instant("from")] = Field()


class IngestionRequest(RootModel[Reading | list[Reading]]):
    """Documents the body only: each item is validated on its own by the consumer's decoder."""

    model_config = ConfigDict(
        json_schema_extra={
            "description": "One reading, or an array of them (at most FLEET_INGEST_MAX_ITEMS). "
            "Each item is validated on its own: invalid items are reported back by index, "
            "not produced.",
            "examples": [
                [
                    {
                        "meterId": EXAMPLE_METER,
                        "kwhConsumedAc": 1.25,
                        "voltage": 229.8,
                        "timestamp": "2026-01-01T12:00:00Z",
                    },
                    {
                        "vehicleId": EXAMPLE_VEHICLE,
                        "soc": 61.5,
                        "kwhDeliveredDc": 1.12,
                        "batteryTemp": 27.0,
                        "timestamp": "2026-01-01T12:00:00Z",
                    },
                ]
            ],
        }
    )


# --- responses ------------------------------------------------------------------------------


class ErrorDetail(ApiModel):
    code: str
    message: str


class Error(ApiModel):
    error: ErrorDetail


class RejectedItem(ApiModel):
    index: int = Field(ge=0)
    reason: str = Field(description="The consumer's reason, e.g. out_of_range.")
    detail: str


class IngestionAccepted(ApiModel):
    accepted: int = Field(ge=1)
    rejected: list[RejectedItem]


class IngestionError(ApiModel):
    """An Error, with the rejected items when the body held readings but no valid one."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=False)

    error: ErrorDetail
    rejected: list[RejectedItem] | None = None


class Performance(ApiModel):
    vehicle_id: str
    from_: UtcInstant = Field()
    to: UtcInstant
    meter_ids: list[str]
    total_kwh_delivered_dc: float
    total_kwh_consumed_ac: float | None
    avg_battery_temp: float | None
    efficiency_ratio: float | None
    status: EfficiencyStatus
    vehicle_readings: int = Field(ge=0)
    meter_readings: int = Field(ge=0)


class FleetVehicle(ApiModel):
    vehicle_id: str
    meter_ids: list[str]
    total_kwh_delivered_dc: float
    total_kwh_consumed_ac: float | None
    efficiency_ratio: float | None
    status: EfficiencyStatus


class FleetEfficiency(ApiModel):
    """The report reads hourly totals: its window is the one asked for, widened to whole UTC
    hours (from down, to up); these are the instants it covers."""

    from_: UtcInstant = Field(description="Start of the window covered: a whole UTC hour.")
    to: UtcInstant = Field(description="End of the window covered (exclusive): a whole UTC hour.")
    vehicles: list[FleetVehicle]
    next_cursor: str | None


class Assignment(ApiModel):
    vehicle_id: str
    meter_id: str
    from_: UtcInstant = Field()
    to: None = None  # a new assignment is open-ended


class AssignmentSpan(ApiModel):
    meter_id: str
    from_: UtcInstant = Field()
    to: UtcInstant | None


class Assignments(ApiModel):
    vehicle_id: str
    assignments: list[AssignmentSpan]


class Stored(ApiModel):
    timestamp: UtcInstant
    updated_at: UtcInstant = Field(description="When the consumer stored it.")


class VehicleLive(Stored):
    vehicle_id: str
    soc: float
    kwh_delivered_dc: float
    battery_temp: float


class MeterLive(Stored):
    meter_id: str
    kwh_consumed_ac: float
    voltage: float


# --- sessions, chargers and alerts ---------------------------------------------------------


def encode_cursor(*key: str | None) -> str:
    """Where a page ended: the last row's sort key, opaque to clients."""
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode()


Key = TypeVar("Key")
# A cursor's ratio, bounded like the ratios the queries return: a forged one is a 400,
# never a SQL error.
CursorRatio = Annotated[Decimal, Field(allow_inf_nan=False, max_digits=24, decimal_places=4)]


def decode_cursor(text: str, key: TypeAdapter[Key]) -> Key:
    """The sort key a cursor of encode_cursor carries, validated; invalid_cursor if forged."""
    try:
        return key.validate_json(base64.urlsafe_b64decode(text.encode()))
    except (ValueError, binascii.Error):  # ValidationError is a ValueError
        raise ApiError(400, "invalid_cursor", "cursor is not one this API returned") from None


class Page(QueryModel):
    limit: Annotated[
        PageSize | None, Invalid("invalid_limit", "limit must be an integer from 1 to 1000")
    ] = Field(default=None, description="Page size (default: FLEET_REPORT_PAGE_SIZE).")
    cursor: Annotated[
        str | None, Invalid("invalid_cursor", "cursor is not one this API returned")
    ] = Field(default=None, description="nextCursor of the previous page.")


class SessionsQuery(Page):
    """Sessions that started in [from, to), newest first; either bound may be left out."""

    from_: Annotated[QueryInstant | None, invalid_instant("from")] = Field(
        default=None, description="Sessions that started at or after this instant."
    )
    to: Annotated[QueryInstant | None, invalid_instant("to")] = Field(
        default=None, description="Sessions that started before this instant."
    )


class SessionPath(ApiModel):
    session_id: Annotated[UUID, Invalid("invalid_session_id", "sessionId must be a UUID")] = Field(
        description="The session's id.", examples=[EXAMPLE_SESSION]
    )


class SessionState(enum.StrEnum):
    OPEN = "open"
    CLOSED = "closed"


class Session(ApiModel):
    session_id: str = Field(description="Stable: the same whenever the session is recomputed.")
    vehicle_id: str
    meter_id: str | None = Field(description="The vehicle's meter when the session started.")
    started_at: UtcInstant = Field(description="The first delivering reading.")
    ended_at: UtcInstant = Field(description="The last delivering reading so far.")
    state: SessionState
    kwh_delivered_dc: float
    kwh_consumed_ac: float | None
    efficiency_ratio: float | None
    status: EfficiencyStatus
    soc_start: float
    soc_end: float
    max_battery_temp: float
    readings: int = Field(ge=1)


class SessionPage(ApiModel):
    sessions: list[Session]
    next_cursor: str | None


class ChargersQuery(Page):
    status: Annotated[
        EfficiencyStatus | None,
        Invalid("invalid_status", f"status must be one of {', '.join(EfficiencyStatus)}"),
    ] = Field(default=None, description="Only chargers with this status.")


class ChargerHealth(ApiModel):
    meter_id: str
    average_efficiency: float | None = Field(
        description="Of its last FLEET_ALERT_SESSIONS closed sessions (null while it has fewer)."
    )
    sessions: int = Field(ge=0, description="Closed, rated sessions counted (at most the last N).")
    status: EfficiencyStatus
    last_session_at: UtcInstant | None
    open_alerts: list[str] = Field(description="Kinds of its unresolved alerts.")


class ChargerPage(ApiModel):
    chargers: list[ChargerHealth]
    next_cursor: str | None


class AlertState(enum.StrEnum):
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"


class AlertsQuery(Page):
    state: Annotated[
        AlertState | None,
        Invalid("invalid_state", f"state must be one of {', '.join(AlertState)}"),
    ] = Field(default=None)
    kind: Annotated[
        AlertKind | None, Invalid("invalid_kind", f"kind must be one of {', '.join(AlertKind)}")
    ] = Field(default=None)
    subject: Annotated[DeviceId | None, invalid_id("subject")] = Field(
        default=None, description="A meter or vehicle id."
    )


class AlertPath(ApiModel):
    alert_id: Annotated[UUID, Invalid("invalid_alert_id", "alertId must be a UUID")] = Field(
        description="The alert's id.", examples=[EXAMPLE_ALERT]
    )


class Alert(ApiModel):
    alert_id: str
    kind: AlertKind
    subject: str
    state: AlertState
    opened_at: UtcInstant = Field(description="Event time of the evidence that opened it.")
    acknowledged_at: UtcInstant | None
    resolved_at: UtcInstant | None
    evidence: dict[str, Any] = Field(description="The sessions or readings that opened it.")


class AlertPage(ApiModel):
    alerts: list[Alert]
    next_cursor: str | None


# The operations endpoints (consumer.api.app), documented with the rest.
class Health(ApiModel):
    status: Literal["ok"]


class Ready(ApiModel):
    status: Literal["ready"]
    checks: dict[str, str]


class NotReady(ApiModel):
    error: ErrorDetail
    checks: dict[str, str]
