"""bytes -> a reading, or a Rejection with a machine-readable reason. Pure; never raises on input.

Checks run cheapest first: size, UTF-8, JSON (no duplicate keys, no NaN or
Infinity), an object, its shape, then the model (strict types, ranges,
timestamps with an offset), then the clock-skew limit.
"""

from __future__ import annotations

import enum
import json
import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from consumer.models import MODEL_OF, Reading, ShapeError, Stream, detect_stream

if TYPE_CHECKING:  # the decoder itself reads no settings
    from consumer.settings import Settings


class Reason(enum.StrEnum):
    EMPTY_PAYLOAD = "empty_payload"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    INVALID_UTF8 = "invalid_utf8"
    MALFORMED_JSON = "malformed_json"
    DUPLICATE_KEY = "duplicate_key"
    NOT_AN_OBJECT = "not_an_object"
    UNKNOWN_SHAPE = ShapeError.NO_ID.value
    AMBIGUOUS_SHAPE = ShapeError.BOTH_IDS.value
    WRONG_TOPIC = "wrong_topic"
    MISSING_FIELD = "missing_field"
    UNKNOWN_FIELD = "unknown_field"
    WRONG_TYPE = "wrong_type"
    NON_FINITE_NUMBER = "non_finite_number"
    OUT_OF_RANGE = "out_of_range"
    INVALID_DEVICE_ID = "invalid_device_id"
    INVALID_TIMESTAMP = "invalid_timestamp"
    TIMESTAMP_WITHOUT_OFFSET = "timestamp_without_offset"
    TIMESTAMP_IN_FUTURE = "timestamp_in_future"
    DATABASE_REJECTED = "database_rejected"  # set by the store, never by the decoder


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: Reason
    detail: str
    stream: Stream | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    max_payload_bytes: int = 16 * 1024
    max_clock_skew: timedelta = timedelta(minutes=5)

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """The input rules of FLEET_MAX_PAYLOAD_BYTES and FLEET_MAX_CLOCK_SKEW_SECONDS."""
        return cls(
            max_payload_bytes=settings.max_payload_bytes,
            max_clock_skew=timedelta(seconds=settings.max_clock_skew_seconds),
        )


# pydantic error type -> our reason; anything not listed is a wrong type.
_REASON_BY_ERROR_TYPE = {
    "missing": Reason.MISSING_FIELD,
    "extra_forbidden": Reason.UNKNOWN_FIELD,
    "finite_number": Reason.NON_FINITE_NUMBER,
    "greater_than": Reason.OUT_OF_RANGE,
    "greater_than_equal": Reason.OUT_OF_RANGE,
    "less_than": Reason.OUT_OF_RANGE,
    "less_than_equal": Reason.OUT_OF_RANGE,
    "timezone_aware": Reason.TIMESTAMP_WITHOUT_OFFSET,
    "datetime_parsing": Reason.INVALID_TIMESTAMP,
    "datetime_from_date_parsing": Reason.INVALID_TIMESTAMP,
    "datetime_object_invalid": Reason.INVALID_TIMESTAMP,
    "string_too_short": Reason.INVALID_DEVICE_ID,
    "string_too_long": Reason.INVALID_DEVICE_ID,
    "string_pattern_mismatch": Reason.INVALID_DEVICE_ID,
}
_MAX_DETAIL_CHARS = 500


class _DuplicateKeyError(ValueError):
    pass


class _NonFiniteError(ValueError):
    pass


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        counts = Counter(key for key, _ in pairs)
        raise _DuplicateKeyError(", ".join(sorted(k for k, n in counts.items() if n > 1)))
    return obj


def _reject_constant(name: str) -> None:
    raise _NonFiniteError(name)


_JSON = json.JSONDecoder(
    object_pairs_hook=_object_without_duplicates, parse_constant=_reject_constant
)


def parse_json(value: bytes | None, limits: Limits) -> Any:  # noqa: PLR0911 -- a return per reason
    """The message as one JSON value, or the Rejection saying why it is not one."""
    if not value:
        return Rejection(Reason.EMPTY_PAYLOAD, "the message value is empty or null")
    if len(value) > limits.max_payload_bytes:
        return Rejection(
            Reason.PAYLOAD_TOO_LARGE,
            f"{len(value)} bytes exceeds the limit of {limits.max_payload_bytes}",
        )
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejection(Reason.INVALID_UTF8, f"not UTF-8 at byte {exc.start}")
    try:
        return _JSON.decode(text)
    except _DuplicateKeyError as exc:
        return Rejection(Reason.DUPLICATE_KEY, f"duplicate keys: {exc}"[:_MAX_DETAIL_CHARS])
    except _NonFiniteError as exc:
        return Rejection(Reason.NON_FINITE_NUMBER, f"{exc} is not a finite number")
    except RecursionError:
        return Rejection(Reason.MALFORMED_JSON, "JSON nested too deeply")
    except ValueError as exc:  # JSONDecodeError, and ints beyond the digit limit
        return Rejection(Reason.MALFORMED_JSON, str(exc)[:_MAX_DETAIL_CHARS])


def parse_json_object(value: bytes | None, limits: Limits) -> dict[str, Any] | Rejection:
    """The message as a JSON object, or why it is not one."""
    obj = parse_json(value, limits)
    if isinstance(obj, Rejection | dict):
        return obj
    return Rejection(Reason.NOT_AN_OBJECT, f"expected a JSON object, got {type(obj).__name__}")


def validate_reading(
    obj: dict[str, Any], expected: Stream | None, *, now: datetime, limits: Limits
) -> Reading | Rejection:
    """Validate one JSON object as the expected stream (None: detect it from the shape)."""
    shape = detect_stream(obj)
    if isinstance(shape, ShapeError):
        if expected is None or shape is ShapeError.BOTH_IDS:
            return Rejection(Reason(shape.value), _shape_detail(shape), expected)
    elif expected is not None and shape is not expected:
        return Rejection(Reason.WRONG_TOPIC, f"a {shape} reading on the {expected} topic", expected)
    stream = expected or Stream(shape)
    try:
        reading: Reading = MODEL_OF[stream].model_validate(obj)
    except ValidationError as exc:
        return _rejection_from(exc, stream)
    if reading.timestamp > now + limits.max_clock_skew:
        return Rejection(
            Reason.TIMESTAMP_IN_FUTURE,
            f"timestamp {reading.timestamp.isoformat()} is more than "
            f"{limits.max_clock_skew.total_seconds():g}s ahead of {now.isoformat()}",
            stream,
        )
    return reading


def decode(
    value: bytes | None, expected: Stream | None, *, now: datetime, limits: Limits
) -> Reading | Rejection:
    """One Kafka message value -> a reading or a Rejection; never raises on input."""
    fast = decode_fast(value, expected, now=now, limits=limits)
    if fast is not None:
        return fast
    obj = parse_json_object(value, limits)
    if isinstance(obj, Rejection):
        return Rejection(obj.reason, obj.detail, expected)
    return validate_reading(obj, expected, now=now, limits=limits)


# Every key of a JSON object is a string followed by a colon, so an object with
# no more of these than the model has fields cannot hold a duplicate key.
_KEY_END = re.compile(r'"\s*:')
_FIELD_COUNT = {stream: len(model.model_fields) for stream, model in MODEL_OF.items()}


def decode_fast(
    value: bytes | None, expected: Stream | None, *, now: datetime, limits: Limits
) -> Reading | None:
    """The common case in one pass of pydantic's JSON parser; None means "take the slow path".

    The slow path (parse_json_object + validate_reading) is the reference: it
    gives every rejection its precise reason. This path only ever accepts
    readings the slow path would accept too.
    """
    if not value or len(value) > limits.max_payload_bytes:
        return None
    stream = expected
    if stream is None:
        is_meter, is_vehicle = b'"meterId"' in value, b'"vehicleId"' in value
        if is_meter == is_vehicle:
            return None
        stream = Stream.METER if is_meter else Stream.VEHICLE
    try:
        text = value.decode("utf-8")
        reading: Reading = MODEL_OF[stream].model_validate_json(text)
    except (UnicodeDecodeError, ValidationError):
        return None
    if len(_KEY_END.findall(text)) > _FIELD_COUNT[stream]:
        return None  # maybe a duplicate key
    if reading.timestamp > now + limits.max_clock_skew:
        return None
    return reading


def _shape_detail(shape: ShapeError) -> str:
    if shape is ShapeError.BOTH_IDS:
        return "has both meterId and vehicleId"
    return "has neither meterId nor vehicleId"


def _rejection_from(exc: ValidationError, stream: Stream) -> Rejection:
    errors = exc.errors(include_url=False, include_input=False)
    reason = _REASON_BY_ERROR_TYPE.get(errors[0]["type"], Reason.WRONG_TYPE)
    detail = "; ".join(
        f"{'.'.join(str(part) for part in err['loc']) or 'value'}: {err['msg']}" for err in errors
    )
    return Rejection(reason, detail[:_MAX_DETAIL_CHARS], stream)
