"""The decoder: every message value becomes a reading or a Rejection with a machine-readable reason.

These are the reasons a dead letter carries; operators and users' scripts filter on them, so each
case asserts the exact value. The hypothesis properties check that no input raises.
"""

from __future__ import annotations

import functools
import json
import math
import re
import string
import unicodedata
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.decode import (
    Limits,
    Reason,
    Rejection,
    decode,
    decode_fast,
    parse_json_object,
    validate_reading,
)
from consumer.models import DEVICE_ID_PATTERN, MAX_KWH, MeterReading, Stream, VehicleReading
from devtools import factories
from devtools.factories import MISSING, to_json

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
LIMITS = Limits()
# Readings of 11:00 against a clock at 12:00, with values worth checking for.
meter = functools.partial(
    factories.meter,
    "meter-0001",
    kwhConsumedAc=1.25,
    voltage=230.5,
    timestamp="2024-06-01T11:00:00+00:00",
)
vehicle = functools.partial(
    factories.vehicle,
    "EV-42",
    soc=57.5,
    kwhDeliveredDc=1.1,
    batteryTemp=31.2,
    timestamp="2024-06-01T11:00:00+00:00",
)
encode = to_json


def with_literal(obj: dict[str, Any], field: str, literal: str) -> bytes:
    """The object as JSON with one field's value written as a raw JSON literal (NaN, 1e400, ...)."""
    text = json.dumps({**obj, field: "\x00placeholder\x00"})
    return text.replace(json.dumps("\x00placeholder\x00"), literal).encode()


def run(
    value: bytes | None,
    expected: Stream | None = None,
    *,
    now: datetime = NOW,
    limits: Limits = LIMITS,
) -> MeterReading | VehicleReading | Rejection:
    return decode(value, expected, now=now, limits=limits)


# --- valid readings -------------------------------------------------------------------------------


@pytest.mark.parametrize("expected", [Stream.METER, None], ids=["meter-topic", "mixed-topic"])
def test_valid_meter_reading_decodes_with_its_values(expected: Stream | None) -> None:
    """A well-formed meter message becomes a MeterReading carrying exactly the values sent."""
    result = run(encode(meter()), expected)
    assert result == MeterReading(
        meterId="meter-0001",
        kwhConsumedAc=1.25,
        voltage=230.5,
        timestamp=datetime(2024, 6, 1, 11, 0, tzinfo=UTC),
    )
    assert result.device_id == "meter-0001"


@pytest.mark.parametrize("expected", [Stream.VEHICLE, None], ids=["vehicle-topic", "mixed-topic"])
def test_valid_vehicle_reading_decodes_with_its_values(expected: Stream | None) -> None:
    """A well-formed vehicle message becomes a VehicleReading carrying exactly the values sent."""
    result = run(encode(vehicle()), expected)
    assert result == VehicleReading(
        vehicleId="EV-42",
        soc=57.5,
        kwhDeliveredDc=1.1,
        batteryTemp=31.2,
        timestamp=datetime(2024, 6, 1, 11, 0, tzinfo=UTC),
    )
    assert result.device_id == "EV-42"


def test_integers_are_accepted_for_numbers() -> None:
    """Devices that send 230 instead of 230.0 are not rejected; the values come out as floats."""
    m = run(encode(meter(kwhConsumedAc=3, voltage=230)))
    v = run(encode(vehicle(soc=80, kwhDeliveredDc=0, batteryTemp=-5)))
    assert isinstance(m, MeterReading)
    assert (m.kwhConsumedAc, m.voltage) == (3.0, 230.0)
    assert isinstance(v, VehicleReading)
    assert (v.soc, v.kwhDeliveredDc, v.batteryTemp) == (80.0, 0.0, -5.0)


@pytest.mark.parametrize(
    ("timestamp", "instant"),
    [
        pytest.param(
            "2024-06-01T16:30:00+05:30", datetime(2024, 6, 1, 11, 0, tzinfo=UTC), id="+05:30"
        ),
        pytest.param("2024-06-01T11:00:00Z", datetime(2024, 6, 1, 11, 0, tzinfo=UTC), id="Z"),
        pytest.param(
            "2024-06-01T07:00:00-04:00", datetime(2024, 6, 1, 11, 0, tzinfo=UTC), id="-04:00"
        ),
        pytest.param(
            "2024-06-01T11:00:00.123456+00:00",
            datetime(2024, 6, 1, 11, 0, 0, 123456, tzinfo=UTC),
            id="microseconds",
        ),
    ],
)
def test_timestamps_with_an_offset_are_accepted_as_the_same_instant(
    timestamp: str, instant: datetime
) -> None:
    """Any ISO-8601 offset (including Z) is accepted and denotes the instant it names."""
    result = run(encode(meter(timestamp=timestamp)), Stream.METER)
    assert isinstance(result, MeterReading)
    assert result.timestamp == instant
    assert result.timestamp.utcoffset() is not None


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param(vehicle(soc=0), id="soc-0"),
        pytest.param(vehicle(soc=100), id="soc-100"),
        pytest.param(vehicle(soc=100.0), id="soc-100.0"),
        pytest.param(vehicle(kwhDeliveredDc=0), id="kwh-dc-0"),
        pytest.param(vehicle(kwhDeliveredDc=MAX_KWH), id="kwh-dc-max"),
        pytest.param(meter(kwhConsumedAc=0.0), id="kwh-ac-0"),
        pytest.param(meter(kwhConsumedAc=9999999.999), id="kwh-ac-9999999.999"),
        pytest.param(vehicle(batteryTemp=-50), id="temp-minus-50"),
        pytest.param(vehicle(batteryTemp=150), id="temp-150"),
        pytest.param(meter(voltage=0), id="voltage-0"),
        pytest.param(meter(meterId="m" * 128), id="id-128-chars"),
        pytest.param(meter(meterId="Zähler/北京-7 #1"), id="id-unicode-and-punctuation"),
    ],
)
def test_values_exactly_at_the_limits_are_accepted(obj: dict[str, Any]) -> None:
    """Boundary values that fit the database columns are stored, not dead-lettered."""
    result = run(encode(obj))
    assert not isinstance(result, Rejection), result


def test_payload_of_exactly_the_size_limit_is_accepted() -> None:
    """A message exactly max_payload_bytes long is within the limit."""
    body = encode(meter())
    limits = Limits(max_payload_bytes=len(body) + 50)
    padded = body + b" " * 50
    assert len(padded) == limits.max_payload_bytes
    assert isinstance(run(padded, limits=limits), MeterReading)


# --- rejections, one reason each ------------------------------------------------------------------

M, V, MIX = Stream.METER, Stream.VEHICLE, None
TS_NO_OFFSET = "2024-06-01T11:00:00"
CASES = [
    # size and encoding, checked before parsing
    pytest.param(b"", MIX, Reason.EMPTY_PAYLOAD, id="empty-bytes"),
    pytest.param(None, M, Reason.EMPTY_PAYLOAD, id="none-tombstone"),
    pytest.param(
        encode(meter()) + b" " * (LIMITS.max_payload_bytes + 1),
        M,
        Reason.PAYLOAD_TOO_LARGE,
        id="oversize-valid-json",
    ),
    pytest.param(
        b"\xff" * (LIMITS.max_payload_bytes + 1),
        MIX,
        Reason.PAYLOAD_TOO_LARGE,
        id="oversize-non-utf8",
    ),
    pytest.param(
        b"[" * (LIMITS.max_payload_bytes + 1),
        MIX,
        Reason.PAYLOAD_TOO_LARGE,
        id="oversize-deep-json",
    ),
    pytest.param(b"\xff\xfe{}", MIX, Reason.INVALID_UTF8, id="non-utf8"),
    pytest.param(b'{"meterId": "\xc3\x28"}', M, Reason.INVALID_UTF8, id="invalid-utf8-in-string"),
    pytest.param(
        json.dumps(meter(meterId="Zähler"), ensure_ascii=False).encode("latin-1"),
        M,
        Reason.INVALID_UTF8,
        id="latin-1",
    ),
    # JSON syntax
    pytest.param(b"not json at all", MIX, Reason.MALFORMED_JSON, id="garbage"),
    pytest.param(encode(meter())[:-10], M, Reason.MALFORMED_JSON, id="truncated"),
    pytest.param(b"\xef\xbb\xbf" + encode(meter()), M, Reason.MALFORMED_JSON, id="utf8-bom"),
    pytest.param(b"   ", MIX, Reason.MALFORMED_JSON, id="whitespace-only"),
    pytest.param(encode(meter()) + b"{}", M, Reason.MALFORMED_JSON, id="two-documents"),
    pytest.param(b"{'meterId': 'm1'}", MIX, Reason.MALFORMED_JSON, id="single-quotes"),
    pytest.param(
        encode(meter(meterId="a\x01b")).replace(b"\\u0001", b"\n"),
        M,
        Reason.MALFORMED_JSON,
        id="raw-control-char-in-string",
    ),
    pytest.param(
        b'{"meterId": "m1", ' + encode(meter())[1:], M, Reason.DUPLICATE_KEY, id="duplicate-key"
    ),
    pytest.param(
        encode(meter())[:-1] + b', "voltage": 231}', MIX, Reason.DUPLICATE_KEY, id="duplicate-field"
    ),
    pytest.param(b'[{"a": 1, "a": 2}]', MIX, Reason.DUPLICATE_KEY, id="duplicate-key-nested"),
    # non-finite numbers
    pytest.param(
        with_literal(meter(), "kwhConsumedAc", "NaN"), M, Reason.NON_FINITE_NUMBER, id="NaN"
    ),
    pytest.param(
        with_literal(vehicle(), "soc", "Infinity"), V, Reason.NON_FINITE_NUMBER, id="Infinity"
    ),
    pytest.param(
        with_literal(meter(), "voltage", "-Infinity"), MIX, Reason.NON_FINITE_NUMBER, id="-Infinity"
    ),
    pytest.param(
        with_literal(meter(), "kwhConsumedAc", "1e400"), M, Reason.NON_FINITE_NUMBER, id="1e400"
    ),
    pytest.param(
        with_literal(vehicle(), "batteryTemp", "-1e400"), MIX, Reason.NON_FINITE_NUMBER, id="-1e400"
    ),
    pytest.param(b"NaN", MIX, Reason.NON_FINITE_NUMBER, id="bare-NaN"),
    # not an object
    pytest.param(encode([meter()]), M, Reason.NOT_AN_OBJECT, id="array"),
    pytest.param(b'"meter"', MIX, Reason.NOT_AN_OBJECT, id="string"),
    pytest.param(b"42", V, Reason.NOT_AN_OBJECT, id="number"),
    pytest.param(b"null", MIX, Reason.NOT_AN_OBJECT, id="null"),
    pytest.param(b"true", MIX, Reason.NOT_AN_OBJECT, id="bool"),
    # shape and topic
    pytest.param(
        encode({**meter(), **vehicle()}), MIX, Reason.AMBIGUOUS_SHAPE, id="both-ids-mixed"
    ),
    pytest.param(encode({**meter(), **vehicle()}), M, Reason.AMBIGUOUS_SHAPE, id="both-ids-meter"),
    pytest.param(encode({"deviceId": "x", "kwh": 1}), MIX, Reason.UNKNOWN_SHAPE, id="neither-id"),
    pytest.param(b"{}", MIX, Reason.UNKNOWN_SHAPE, id="empty-object-mixed"),
    pytest.param(encode(vehicle()), M, Reason.WRONG_TOPIC, id="vehicle-on-meter-topic"),
    pytest.param(encode(meter()), V, Reason.WRONG_TOPIC, id="meter-on-vehicle-topic"),
    # fields
    pytest.param(encode(meter(voltage=MISSING)), M, Reason.MISSING_FIELD, id="missing-voltage"),
    pytest.param(encode(vehicle(timestamp=MISSING)), MIX, Reason.MISSING_FIELD, id="missing-ts"),
    pytest.param(encode(meter(meterId=MISSING)), M, Reason.MISSING_FIELD, id="missing-id-on-topic"),
    pytest.param(b"{}", V, Reason.MISSING_FIELD, id="empty-object-on-topic"),
    pytest.param(encode(meter(firmware="1.2")), M, Reason.UNKNOWN_FIELD, id="extra-field"),
    pytest.param(encode(vehicle(Soc=50)), MIX, Reason.UNKNOWN_FIELD, id="miscased-extra-field"),
    # types
    pytest.param(encode(meter(kwhConsumedAc="1.5")), M, Reason.WRONG_TYPE, id="number-as-string"),
    pytest.param(encode(vehicle(soc=True)), V, Reason.WRONG_TYPE, id="bool-as-number"),
    pytest.param(encode(meter(voltage={"v": 230})), MIX, Reason.WRONG_TYPE, id="object-as-number"),
    pytest.param(encode(vehicle(batteryTemp=[20])), MIX, Reason.WRONG_TYPE, id="list-as-number"),
    pytest.param(encode(meter(voltage=None)), M, Reason.WRONG_TYPE, id="null-as-number"),
    pytest.param(encode(meter(meterId=1234)), M, Reason.WRONG_TYPE, id="number-as-id"),
    pytest.param(encode(meter(timestamp=True)), M, Reason.WRONG_TYPE, id="bool-as-timestamp"),
    # ranges
    pytest.param(encode(meter(kwhConsumedAc=-0.001)), M, Reason.OUT_OF_RANGE, id="negative-kwh-ac"),
    pytest.param(encode(vehicle(kwhDeliveredDc=-1)), V, Reason.OUT_OF_RANGE, id="negative-kwh-dc"),
    pytest.param(
        encode(meter(kwhConsumedAc=10_000_000)), M, Reason.OUT_OF_RANGE, id="kwh-above-max"
    ),
    pytest.param(
        encode(vehicle(kwhDeliveredDc=9999999.9991)),
        V,
        Reason.OUT_OF_RANGE,
        id="kwh-just-above-max",
    ),
    pytest.param(encode(vehicle(soc=100.01)), V, Reason.OUT_OF_RANGE, id="soc-above-100"),
    pytest.param(encode(vehicle(soc=-0.01)), MIX, Reason.OUT_OF_RANGE, id="soc-below-0"),
    pytest.param(encode(vehicle(batteryTemp=-50.01)), V, Reason.OUT_OF_RANGE, id="temp-below-50"),
    pytest.param(encode(vehicle(batteryTemp=150.01)), V, Reason.OUT_OF_RANGE, id="temp-above-150"),
    pytest.param(encode(meter(voltage=-1)), M, Reason.OUT_OF_RANGE, id="negative-voltage"),
    # device ids
    pytest.param(encode(meter(meterId="")), M, Reason.INVALID_DEVICE_ID, id="empty-id"),
    pytest.param(encode(meter(meterId="m" * 129)), M, Reason.INVALID_DEVICE_ID, id="id-129-chars"),
    pytest.param(encode(meter(meterId="m\x001")), M, Reason.INVALID_DEVICE_ID, id="id-escaped-nul"),
    pytest.param(
        encode(vehicle(vehicleId="EV\n42")), MIX, Reason.INVALID_DEVICE_ID, id="id-newline"
    ),
    pytest.param(encode(vehicle(vehicleId="EV\x7f")), V, Reason.INVALID_DEVICE_ID, id="id-DEL"),
    # timestamps
    pytest.param(
        encode(meter(timestamp=TS_NO_OFFSET)), M, Reason.TIMESTAMP_WITHOUT_OFFSET, id="ts-no-offset"
    ),
    pytest.param(
        encode(vehicle(timestamp="2024-06-01")),
        V,
        Reason.TIMESTAMP_WITHOUT_OFFSET,
        id="ts-date-only",
    ),
    pytest.param(
        encode(meter(timestamp="yesterday")), M, Reason.INVALID_TIMESTAMP, id="ts-unparseable"
    ),
    pytest.param(
        encode(meter(timestamp="2024-13-01T00:00:00Z")),
        M,
        Reason.INVALID_TIMESTAMP,
        id="ts-month-13",
    ),
    pytest.param(
        encode(meter(timestamp="2024-06-01T11:00:00+25:00")),
        M,
        Reason.INVALID_TIMESTAMP,
        id="ts-offset-25h",
    ),
    pytest.param(
        encode(meter(timestamp="2024-06-01T12:05:01Z")),
        M,
        Reason.TIMESTAMP_IN_FUTURE,
        id="ts-beyond-skew",
    ),
    pytest.param(
        encode(vehicle(timestamp="2024-06-01T17:36:00+05:30")),
        MIX,
        Reason.TIMESTAMP_IN_FUTURE,
        id="ts-beyond-skew-in-offset",
    ),
    pytest.param(
        encode(meter(timestamp="2999-01-01T00:00:00Z")), M, Reason.TIMESTAMP_IN_FUTURE, id="ts-2999"
    ),
]


@pytest.mark.parametrize(("value", "expected", "reason"), CASES)
def test_bad_message_is_rejected_with_its_reason(
    value: bytes | None, expected: Stream | None, reason: Reason
) -> None:
    """Each kind of bad input becomes a Rejection with the one machine-readable reason for it."""
    result = run(value, expected)
    assert isinstance(result, Rejection), result
    assert result.reason is reason, result
    assert result.detail.strip()


@pytest.mark.parametrize(("value", "expected", "reason"), CASES)
def test_rejection_on_a_dedicated_topic_is_attributed_to_that_stream(
    value: bytes | None, expected: Stream | None, reason: Reason
) -> None:
    """A dead letter from the meter or vehicle topic is counted against that topic's stream."""
    result = run(value, expected)
    assert isinstance(result, Rejection)
    if expected is not None:
        assert result.stream is expected


def test_rejection_on_the_mixed_topic_names_the_detected_stream() -> None:
    """A bad vehicle reading on the mixed topic is still recognised as a vehicle reading."""
    result = run(encode(vehicle(soc=101)), None)
    assert isinstance(result, Rejection)
    assert (result.reason, result.stream) == (Reason.OUT_OF_RANGE, Stream.VEHICLE)


def test_rejection_detail_names_the_offending_field() -> None:
    """The detail tells an operator which field was wrong without echoing the payload."""
    result = run(encode(vehicle(batteryTemp=151, vehicleId="secret-vin")), Stream.VEHICLE)
    assert isinstance(result, Rejection)
    assert "batteryTemp" in result.detail
    assert "secret-vin" not in result.detail


def test_payload_size_is_checked_against_the_configured_limit() -> None:
    """A smaller configured limit rejects a valid reading that exceeds it."""
    body = encode(meter())
    result = run(body, Stream.METER, limits=Limits(max_payload_bytes=len(body) - 1))
    assert isinstance(result, Rejection)
    assert result.reason is Reason.PAYLOAD_TOO_LARGE
    assert str(len(body)) in result.detail


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b"[" * 100_000, id="open-arrays"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="closed-arrays"),
        pytest.param(b'{"a":' * 100_000, id="open-objects"),
        pytest.param(b'{"a":' * 100_000 + b"1" + b"}" * 100_000, id="closed-objects"),
    ],
)
def test_deeply_nested_json_is_rejected_not_raised(value: bytes) -> None:
    """A pathological nesting depth inside a generous size limit is malformed JSON, not a crash."""
    result = run(value, None, limits=Limits(max_payload_bytes=2_000_000))
    assert isinstance(result, Rejection)
    assert result.reason is Reason.MALFORMED_JSON
    assert result.detail


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b"7" * 5000, id="top-level"),
        pytest.param(with_literal(meter(), "kwhConsumedAc", "9" * 5000), id="kwh"),
        pytest.param(with_literal(vehicle(), "soc", "-" + "1" * 5000), id="negative-soc"),
    ],
)
def test_huge_integer_literal_is_rejected_not_raised(value: bytes) -> None:
    """A 5000-digit integer (beyond Python's int parsing limit) is dead-lettered, not a crash."""
    result = run(value, None)
    assert isinstance(result, Rejection)
    assert result.detail


@pytest.mark.parametrize(
    "literal", ["1" + "0" * 400, "-1" + "0" * 400], ids=["plus-1e400-int", "minus-1e400-int"]
)
def test_integer_too_big_for_a_float_is_rejected(literal: str) -> None:
    """An integer that does not fit a float (but parses) is rejected, not stored or raised."""
    result = run(with_literal(meter(), "kwhConsumedAc", literal), Stream.METER)
    assert isinstance(result, Rejection)
    assert result.detail


# --- clock skew -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ahead",
    [
        pytest.param(timedelta(0), id="now"),
        pytest.param(LIMITS.max_clock_skew - timedelta(seconds=1), id="just-inside-skew"),
        pytest.param(LIMITS.max_clock_skew, id="exactly-at-skew"),
        pytest.param(-timedelta(days=3650), id="ten-years-ago"),
    ],
)
def test_timestamp_within_the_clock_skew_is_accepted(ahead: timedelta) -> None:
    """A device clock slightly ahead of ours (up to max_clock_skew) is tolerated."""
    ts = (NOW + ahead).isoformat()
    result = run(encode(meter(timestamp=ts)), Stream.METER)
    assert isinstance(result, MeterReading), result


@pytest.mark.parametrize(
    "ahead",
    [
        pytest.param(LIMITS.max_clock_skew + timedelta(microseconds=1), id="1us-beyond"),
        pytest.param(LIMITS.max_clock_skew + timedelta(seconds=1), id="1s-beyond"),
        pytest.param(timedelta(days=1), id="a-day-ahead"),
    ],
)
def test_timestamp_beyond_the_clock_skew_is_in_the_future(ahead: timedelta) -> None:
    """A reading dated more than max_clock_skew after `now` is rejected as timestamp_in_future."""
    ts = (NOW + ahead).astimezone(timezone(timedelta(hours=-7))).isoformat()
    result = run(encode(vehicle(timestamp=ts)), Stream.VEHICLE)
    assert isinstance(result, Rejection)
    assert result.reason is Reason.TIMESTAMP_IN_FUTURE
    assert result.stream is Stream.VEHICLE


def test_clock_skew_is_measured_from_the_now_argument() -> None:
    """The future check uses the caller's clock, so the same message passes a day later."""
    value = encode(meter(timestamp="2024-06-02T12:00:00Z"))
    assert isinstance(run(value, Stream.METER, now=NOW), Rejection)
    assert isinstance(run(value, Stream.METER, now=NOW + timedelta(days=1)), MeterReading)


def test_custom_clock_skew_limit_is_honoured() -> None:
    """A tighter max_clock_skew rejects a timestamp the default would have accepted."""
    value = encode(meter(timestamp=(NOW + timedelta(minutes=2)).isoformat()))
    assert isinstance(run(value, Stream.METER), MeterReading)
    tight = run(value, Stream.METER, limits=Limits(max_clock_skew=timedelta(minutes=1)))
    assert isinstance(tight, Rejection)
    assert tight.reason is Reason.TIMESTAMP_IN_FUTURE


# --- known gaps: these fail until consumer/ is fixed ----------------------------------------------


@pytest.mark.parametrize(
    ("timestamp", "reason"),
    [
        pytest.param(1717236000, Reason.WRONG_TYPE, id="int-epoch"),
        pytest.param(1717236000.5, Reason.WRONG_TYPE, id="float-epoch"),
        pytest.param("1717236000", Reason.INVALID_TIMESTAMP, id="epoch-as-string"),
    ],
)
def test_epoch_timestamp_is_rejected(timestamp: float | str, reason: Reason) -> None:
    """The spec asks for ISO-8601 with an offset, so a Unix epoch timestamp is dead-lettered."""
    result = run(encode(meter(timestamp=timestamp)), Stream.METER)
    assert isinstance(result, Rejection), f"accepted as {result!r}"
    assert result.reason is reason


def test_timestamp_whose_utc_instant_is_before_year_1_is_rejected() -> None:
    """A reading the decoder accepts must be storable: its instant must exist in UTC."""
    result = run(encode(meter(timestamp="0001-01-01T00:00:00+01:00")), Stream.METER)
    assert isinstance(result, Rejection), f"accepted as {result!r}"
    assert result.reason is Reason.INVALID_TIMESTAMP


# --- properties -----------------------------------------------------------------------------------

STREAMS = st.sampled_from([None, Stream.METER, Stream.VEHICLE])
FIELD_NAMES = [
    "meterId",
    "vehicleId",
    "kwhConsumedAc",
    "voltage",
    "soc",
    "kwhDeliveredDc",
    "batteryTemp",
    "timestamp",
]
MINUTE_OFFSETS = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(
    lambda m: timezone(timedelta(minutes=m))
)
OFFSETS = st.one_of(
    MINUTE_OFFSETS,
    st.timedeltas(
        min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23, minutes=59)
    ).map(timezone),
)
TIMESTAMP_STRINGS = st.one_of(
    st.datetimes(timezones=st.none() | OFFSETS | st.just(UTC)).map(datetime.isoformat),
    st.datetimes(
        min_value=datetime(2024, 5, 31), max_value=datetime(2024, 6, 2), timezones=st.just(UTC)
    ).map(lambda d: d.isoformat().replace("+00:00", "Z")),
    st.dates().map(str),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**500), max_value=10**500),
    st.integers(min_value=-100, max_value=200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-60, max_value=10_000_001),
    st.text(max_size=140),
    TIMESTAMP_STRINGS,
)
JSONISH = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=10), children, max_size=4),
    ),
    max_leaves=12,
)


def mostly(
    plausible: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """Plausible values three times in four, so accepted readings are common enough to check."""
    return st.integers(min_value=0, max_value=3).flatmap(lambda n: hostile if n == 0 else plausible)


DEVICE_IDS = mostly(
    st.text(alphabet=string.ascii_letters + string.digits + "-_:./ ", min_size=1, max_size=128),
    st.one_of(st.text(max_size=130), st.just(""), st.text(min_size=128, max_size=129)),
)
NUMBERS = mostly(
    st.one_of(
        st.floats(min_value=-60, max_value=10_000_001),
        st.floats(min_value=-60, max_value=160),
        st.integers(min_value=-60, max_value=200),
        st.sampled_from([0, -0.0, 100, 100.0000001, -50, 150, MAX_KWH, 10_000_000, -1e-9]),
    ),
    SCALARS,
)
TIMESTAMPS = mostly(
    st.one_of(
        st.datetimes(max_value=datetime(2024, 6, 1), timezones=MINUTE_OFFSETS | st.just(UTC)),
        st.datetimes(
            min_value=datetime(2024, 6, 1, 11, 50),
            max_value=datetime(2024, 6, 1, 12, 10),
            timezones=st.just(UTC),
        ),
    ).map(datetime.isoformat),
    TIMESTAMP_STRINGS | SCALARS,
)


def readingish(required: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects shaped like one reading, half of them with fields added, replaced or removed."""
    whole = st.fixed_dictionaries(required)
    extra = st.dictionaries(
        st.sampled_from(FIELD_NAMES) | st.text(max_size=10), JSONISH, max_size=3
    )
    drop = st.sets(st.sampled_from(FIELD_NAMES), max_size=2)
    mutated = st.tuples(whole, extra, drop).map(
        lambda t: {k: v for k, v in {**t[0], **t[1]}.items() if k not in t[2]}
    )
    return whole | mutated


OBJECTS = st.one_of(
    readingish(
        {
            "meterId": DEVICE_IDS,
            "kwhConsumedAc": NUMBERS,
            "voltage": NUMBERS,
            "timestamp": TIMESTAMPS,
        }
    ),
    readingish(
        {
            "vehicleId": DEVICE_IDS,
            "soc": NUMBERS,
            "kwhDeliveredDc": NUMBERS,
            "batteryTemp": NUMBERS,
            "timestamp": TIMESTAMPS,
        }
    ),
    st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=10), JSONISH, max_size=9),
    JSONISH,
)
PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, database=None)


def check_outcome(result: object, expected: Stream | None) -> None:
    """What every decode() result must satisfy: a valid reading, or a reasoned Rejection."""
    if isinstance(result, Rejection):
        assert isinstance(result.reason, Reason)
        assert result.reason is not Reason.DATABASE_REJECTED
        assert isinstance(result.detail, str)
        assert result.detail.strip()
        if expected is not None:
            assert result.stream is expected
        return
    assert isinstance(result, MeterReading | VehicleReading), result
    if expected is Stream.METER:
        assert isinstance(result, MeterReading)
    if expected is Stream.VEHICLE:
        assert isinstance(result, VehicleReading)
    assert result.timestamp.tzinfo is not None
    assert result.timestamp.utcoffset() is not None
    assert result.timestamp <= NOW + LIMITS.max_clock_skew
    assert 1 <= len(result.device_id) <= 128
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in result.device_id)
    if isinstance(result, MeterReading):
        assert math.isfinite(result.kwhConsumedAc)
        assert 0 <= result.kwhConsumedAc <= MAX_KWH
        assert math.isfinite(result.voltage)
        assert result.voltage >= 0
    else:
        assert math.isfinite(result.soc) and 0 <= result.soc <= 100
        assert math.isfinite(result.kwhDeliveredDc)
        assert 0 <= result.kwhDeliveredDc <= MAX_KWH
        assert math.isfinite(result.batteryTemp) and -50 <= result.batteryTemp <= 150


@PROPERTY_SETTINGS
@given(value=st.binary(max_size=512) | st.none(), expected=STREAMS)
def test_any_bytes_decode_to_a_reading_or_a_rejection(
    value: bytes | None, expected: Stream | None
) -> None:
    """No byte sequence makes decode() raise; it returns a reading or a reasoned Rejection."""
    check_outcome(run(value, expected), expected)


@PROPERTY_SETTINGS
@given(
    value=st.text(max_size=512).map(str.encode),
    expected=STREAMS,
    limit=st.sampled_from([8, 64, LIMITS.max_payload_bytes]),
)
def test_any_text_decodes_to_a_reading_or_a_rejection(
    value: bytes, expected: Stream | None, limit: int
) -> None:
    """No UTF-8 text, at any size limit, makes decode() raise."""
    check_outcome(run(value, expected, limits=Limits(max_payload_bytes=limit)), expected)


@PROPERTY_SETTINGS
@given(obj=OBJECTS, expected=STREAMS)
def test_any_json_value_decodes_to_a_valid_reading_or_a_rejection(
    obj: Any, expected: Stream | None
) -> None:
    """Any JSON built from the real field names and hostile values decodes without raising,
    and whatever is accepted is within the ranges the database columns enforce."""
    check_outcome(run(encode(obj), expected), expected)


@PROPERTY_SETTINGS
@given(obj=OBJECTS, expected=STREAMS)
def test_fast_path_accepts_only_what_the_reference_path_accepts(
    obj: Any, expected: Stream | None
) -> None:
    """The hot-path decoder never accepts a message the strict reference path would reject,
    and accepts it with the same values."""
    value = encode(obj)
    fast = decode_fast(value, expected, now=NOW, limits=LIMITS)
    parsed = parse_json_object(value, LIMITS)
    reference = (
        parsed
        if isinstance(parsed, Rejection)
        else validate_reading(parsed, expected, now=NOW, limits=LIMITS)
    )
    if fast is not None:
        assert fast == reference


@PROPERTY_SETTINGS
@given(
    kwh=st.floats(min_value=0, max_value=MAX_KWH) | st.integers(0, 9_999_999),
    voltage=st.floats(min_value=0, max_value=100_000) | st.integers(0, 100_000),
    ts=st.datetimes(
        min_value=datetime(1970, 1, 2),
        max_value=datetime(2024, 5, 31),  # a day before NOW: any offset keeps it in the past
        timezones=MINUTE_OFFSETS | st.just(UTC),
    ),
    device=st.from_regex(DEVICE_ID_PATTERN, fullmatch=True).filter(lambda d: len(d) <= 128),
)
def test_any_in_range_meter_reading_round_trips(
    kwh: float, voltage: float, ts: datetime, device: str
) -> None:
    """A meter reading inside every range is accepted on both topics with its values intact."""
    value = encode(
        meter(meterId=device, kwhConsumedAc=kwh, voltage=voltage, timestamp=ts.isoformat())
    )
    for expected in (Stream.METER, None):
        result = run(value, expected)
        assert isinstance(result, MeterReading), result
        assert (result.meterId, result.kwhConsumedAc, result.voltage) == (device, kwh, voltage)
        assert result.timestamp == ts


@PROPERTY_SETTINGS
@given(
    soc=st.floats(min_value=0, max_value=100) | st.integers(0, 100),
    kwh=st.floats(min_value=0, max_value=MAX_KWH) | st.integers(0, 9_999_999),
    temp=st.floats(min_value=-50, max_value=150) | st.integers(-50, 150),
    ts=st.datetimes(
        min_value=datetime(1970, 1, 2),
        max_value=datetime(2024, 5, 31),  # a day before NOW: any offset keeps it in the past
        timezones=MINUTE_OFFSETS | st.just(UTC),
    ),
)
def test_any_in_range_vehicle_reading_round_trips(
    soc: float, kwh: float, temp: float, ts: datetime
) -> None:
    """A vehicle reading inside every range is accepted on both topics with its values intact."""
    value = encode(vehicle(soc=soc, kwhDeliveredDc=kwh, batteryTemp=temp, timestamp=ts.isoformat()))
    for expected in (Stream.VEHICLE, None):
        result = run(value, expected)
        assert isinstance(result, VehicleReading), result
        assert (result.soc, result.kwhDeliveredDc, result.batteryTemp) == (soc, kwh, temp)
        assert result.timestamp == ts


@PROPERTY_SETTINGS
@given(text=st.text(min_size=1, max_size=128))
def test_the_device_id_rule_is_one_rule_for_the_decoder_and_python(text: str) -> None:
    """pydantic runs the id pattern with Rust's regex engine, the OpenAPI document is read by
    others: both engines agree on every string, and only visible characters pass."""
    accepted = isinstance(run(encode(meter(meterId=text)), Stream.METER), MeterReading)
    by_python = re.fullmatch(DEVICE_ID_PATTERN, text) is not None
    assert accepted == by_python
    if by_python:
        assert text == text.strip(" ")
        assert all(unicodedata.category(c) not in ("Cc", "Cf", "Zl", "Zp") for c in text)
