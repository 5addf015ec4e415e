"""A poll as a batch (readings per stream, dead letters, offsets), and collapse-to-newest."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from consumer.batch import Batch, DeadLetter, OffsetRange, build_batch
from consumer.decode import Limits, Reason
from consumer.models import MeterReading, Stream, VehicleReading
from devtools.factories import meter, to_json, vehicle

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
LIMITS = Limits()
METER_TOPIC, VEHICLE_TOPIC, MIXED_TOPIC = "meter-telemetry", "vehicle-telemetry", "fleet-telemetry"
STREAM_OF_TOPIC: dict[str, Stream | None] = {
    METER_TOPIC: Stream.METER,
    VEHICLE_TOPIC: Stream.VEHICLE,
    MIXED_TOPIC: None,
}


@dataclass(frozen=True, slots=True)
class FakeMessage:
    """The parts of a Kafka record the batch reads."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def meter_json(meter_id: str, kwh: float = 1.0, ts: str = "2024-06-01T11:00:00Z") -> bytes:
    return to_json(meter(meter_id, kwhConsumedAc=kwh, timestamp=ts))


def vehicle_json(vehicle_id: str, soc: float = 50.0, ts: str = "2024-06-01T11:00:00Z") -> bytes:
    return to_json(vehicle(vehicle_id, soc=soc, timestamp=ts))


def msg(
    topic: str, partition: int, offset: int, value: bytes | None, key: bytes | None = None
) -> FakeMessage:
    return FakeMessage(topic, partition, offset, key, value)


def build(messages: list[FakeMessage], *, now: datetime = NOW, limits: Limits = LIMITS) -> Batch:
    return build_batch(messages, STREAM_OF_TOPIC, now=now, limits=limits)


def spans(batch: Batch) -> dict[tuple[str, int], tuple[int, int]]:
    """Each partition's (first, next) offsets."""
    return {tp: (r.first, r.next) for tp, r in batch.offsets.items()}


def meter_reading(device: str, ts: datetime, kwh: float = 1.0) -> MeterReading:
    return MeterReading.model_validate(meter(device, kwhConsumedAc=kwh, timestamp=ts))


def vehicle_reading(device: str, ts: datetime, soc: float = 50.0) -> VehicleReading:
    return VehicleReading.model_validate(vehicle(device, soc=soc, timestamp=ts))


# --- build_batch ----------------------------------------------------------------------------------

MIXED_POLL = [
    msg(METER_TOPIC, 0, 10, meter_json("m1"), b"m1"),
    msg(METER_TOPIC, 0, 11, b"\xff not json", b"m?"),
    msg(METER_TOPIC, 0, 12, meter_json("m2"), b"m2"),
    msg(METER_TOPIC, 1, 3, vehicle_json("v9"), b"v9"),
    msg(VEHICLE_TOPIC, 0, 100, vehicle_json("v1"), b"v1"),
    msg(VEHICLE_TOPIC, 0, 101, None, b"v1"),
    msg(MIXED_TOPIC, 2, 7, meter_json("m3"), b"m3"),
    msg(MIXED_TOPIC, 2, 8, vehicle_json("v2"), b"v2"),
    msg(MIXED_TOPIC, 2, 9, b"{}", None),
]


def test_valid_readings_are_split_by_stream_in_arrival_order() -> None:
    """Meter and vehicle readings from dedicated and mixed topics land in their own stream."""
    batch = build(MIXED_POLL)
    assert [r.device_id for r in batch.readings[Stream.METER]] == ["m1", "m2", "m3"]
    assert [r.device_id for r in batch.readings[Stream.VEHICLE]] == ["v1", "v2"]
    assert all(isinstance(r, MeterReading) for r in batch.readings[Stream.METER])
    assert all(isinstance(r, VehicleReading) for r in batch.readings[Stream.VEHICLE])


def test_sources_are_aligned_with_readings() -> None:
    """Each reading's source at the same index is the very message it was decoded from."""
    batch = build(MIXED_POLL)
    for stream in Stream:
        readings, sources = batch.readings[stream], batch.sources[stream]
        assert len(readings) == len(sources)
        for reading, source in zip(readings, sources, strict=True):
            assert source in MIXED_POLL
            assert source.key == reading.device_id.encode()
    assert [(m.topic, m.offset) for m in batch.sources[Stream.METER]] == [
        (METER_TOPIC, 10),
        (METER_TOPIC, 12),
        (MIXED_TOPIC, 7),
    ]
    assert [(m.topic, m.offset) for m in batch.sources[Stream.VEHICLE]] == [
        (VEHICLE_TOPIC, 100),
        (MIXED_TOPIC, 8),
    ]


def test_rejected_messages_become_dead_letters_with_their_origin_and_reason() -> None:
    """Every bad message is kept with topic, partition, offset, key, original bytes and reason."""
    batch = build(MIXED_POLL)
    got = [
        (d.topic, d.partition, d.offset, d.key, d.payload, d.rejection.reason, d.rejection.stream)
        for d in batch.dead_letters
    ]
    assert got == [
        (METER_TOPIC, 0, 11, b"m?", b"\xff not json", Reason.INVALID_UTF8, Stream.METER),
        (METER_TOPIC, 1, 3, b"v9", vehicle_json("v9"), Reason.WRONG_TOPIC, Stream.METER),
        (VEHICLE_TOPIC, 0, 101, b"v1", None, Reason.EMPTY_PAYLOAD, Stream.VEHICLE),
        (MIXED_TOPIC, 2, 9, None, b"{}", Reason.UNKNOWN_SHAPE, None),
    ]
    assert all(isinstance(d, DeadLetter) and d.rejection.detail for d in batch.dead_letters)


def test_every_message_is_either_a_reading_or_a_dead_letter() -> None:
    """Nothing in a poll is silently dropped: readings plus dead letters equal the messages."""
    batch = build(MIXED_POLL)
    assert len(batch) == len(MIXED_POLL)
    accounted = [*batch.sources[Stream.METER], *batch.sources[Stream.VEHICLE]]
    accounted += [
        next(
            m
            for m in MIXED_POLL
            if (m.topic, m.partition, m.offset) == (d.topic, d.partition, d.offset)
        )
        for d in batch.dead_letters
    ]
    assert sorted(accounted, key=repr) == sorted(MIXED_POLL, key=repr)


def test_offsets_cover_each_partition_from_first_to_last_plus_one() -> None:
    """Each topic-partition gets first = smallest offset, next = largest + 1, rejects included."""
    batch = build(MIXED_POLL)
    assert spans(batch) == {
        (METER_TOPIC, 0): (10, 13),
        (METER_TOPIC, 1): (3, 4),
        (VEHICLE_TOPIC, 0): (100, 102),
        (MIXED_TOPIC, 2): (7, 10),
    }


def test_each_partition_carries_its_newest_event_time_across_merged_chunks() -> None:
    """The newest reading's timestamp per partition (what the sessions watermark follows);
    a partition of rejects only has none, and merging keeps the newer of two chunks."""
    first = build(
        [
            msg(METER_TOPIC, 0, 1, meter_json("a", ts="2024-06-01T11:05:00Z")),
            msg(METER_TOPIC, 0, 2, meter_json("b", ts="2024-06-01T11:01:00Z")),
            msg(METER_TOPIC, 1, 1, b"not json"),
        ]
    )
    later = build([msg(METER_TOPIC, 0, 3, meter_json("a", ts="2024-06-01T11:03:00Z"))])
    assert first.offsets[(METER_TOPIC, 0)].newest == datetime(2024, 6, 1, 11, 5, tzinfo=UTC)
    assert first.offsets[(METER_TOPIC, 1)].newest is None
    first.extend(later)
    assert first.offsets[(METER_TOPIC, 0)] == OffsetRange(
        1, 4, datetime(2024, 6, 1, 11, 5, tzinfo=UTC)
    )


def test_offsets_do_not_depend_on_message_order() -> None:
    """Messages handed over out of offset order still give the smallest first and largest + 1."""
    batch = build([msg(METER_TOPIC, 4, off, meter_json(f"m{off}")) for off in (50, 42, 57, 44)])
    assert spans(batch) == {(METER_TOPIC, 4): (42, 58)}


def test_same_partition_number_on_different_topics_is_tracked_separately() -> None:
    """Partition 0 of the meter topic and partition 0 of the mixed topic keep their own ranges."""
    batch = build(
        [
            msg(METER_TOPIC, 0, 5, meter_json("m1")),
            msg(MIXED_TOPIC, 0, 900, meter_json("m2")),
            msg(METER_TOPIC, 0, 6, meter_json("m3")),
        ]
    )
    assert spans(batch) == {(METER_TOPIC, 0): (5, 7), (MIXED_TOPIC, 0): (900, 901)}


def test_partition_of_only_rejects_still_advances() -> None:
    """A partition whose every message is bad moves past them, so bad input never blocks it."""
    batch = build([msg(VEHICLE_TOPIC, 3, off, b"garbage") for off in (20, 21, 22)])
    assert batch.readings == {Stream.METER: [], Stream.VEHICLE: []}
    assert len(batch.dead_letters) == 3
    assert {d.rejection.reason for d in batch.dead_letters} == {Reason.MALFORMED_JSON}
    assert batch.offsets == {(VEHICLE_TOPIC, 3): OffsetRange(first=20, next=23)}  # no reading


def test_empty_poll_gives_an_empty_batch() -> None:
    """No messages means no readings, no dead letters and no offsets to store."""
    batch = build([])
    assert len(batch) == 0
    assert batch.readings == {Stream.METER: [], Stream.VEHICLE: []}
    assert batch.sources == {Stream.METER: [], Stream.VEHICLE: []}
    assert batch.dead_letters == []
    assert batch.offsets == {}


def test_batch_applies_the_clock_and_limits_it_is_given() -> None:
    """The now and limits passed to build_batch decide future timestamps and oversize payloads."""
    future = meter_json("m1", ts="2024-06-01T13:00:00Z")
    big = meter_json("m2", kwh=2.0) + b" " * 100
    messages = [msg(METER_TOPIC, 0, 1, future), msg(METER_TOPIC, 0, 2, big)]

    strict = build(messages, limits=Limits(max_payload_bytes=100))
    assert [d.rejection.reason for d in strict.dead_letters] == [
        Reason.TIMESTAMP_IN_FUTURE,
        Reason.PAYLOAD_TOO_LARGE,
    ]

    later = build(messages, now=NOW + timedelta(hours=2))
    assert [r.device_id for r in later.readings[Stream.METER]] == ["m1", "m2"]
    assert later.dead_letters == []
