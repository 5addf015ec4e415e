"""One poll's records as a batch: decoded readings, rejects, offset ranges. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, TypeVar

from consumer.decode import Limits, Rejection, decode
from consumer.models import MeterReading, Reading, Stream


class Message(Protocol):
    """What the batch needs of a Kafka record (aiokafka's ConsumerRecord has it)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


@dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    payload: bytes | None
    rejection: Rejection


def dead_letter(msg: Message, rejection: Rejection) -> DeadLetter:
    return DeadLetter(msg.topic, msg.partition, msg.offset, msg.key, msg.value, rejection)


@dataclass(frozen=True, slots=True)
class OffsetRange:
    """Offsets of one partition in the batch; ``next`` is what gets stored."""

    first: int
    next: int


@dataclass(slots=True)
class Batch:
    """Valid readings per stream, each with the message it came from (same index)."""

    readings: dict[Stream, list[Reading]] = field(
        default_factory=lambda: {stream: [] for stream in Stream}
    )
    sources: dict[Stream, list[Message]] = field(
        default_factory=lambda: {stream: [] for stream in Stream}
    )
    dead_letters: list[DeadLetter] = field(default_factory=list)
    offsets: dict[tuple[str, int], OffsetRange] = field(default_factory=dict)

    def __len__(self) -> int:
        return sum(len(r) for r in self.readings.values()) + len(self.dead_letters)


def build_batch(
    messages: Iterable[Message],
    stream_of_topic: Mapping[str, Stream | None],
    *,
    now: datetime,
    limits: Limits,
) -> Batch:
    """Decode every message; a topic mapped to None is the mixed topic (shape-detected)."""
    batch = Batch()
    for msg in messages:
        result = decode(msg.value, stream_of_topic[msg.topic], now=now, limits=limits)
        if isinstance(result, Rejection):
            batch.dead_letters.append(dead_letter(msg, result))
        else:
            stream = Stream.METER if isinstance(result, MeterReading) else Stream.VEHICLE
            batch.readings[stream].append(result)
            batch.sources[stream].append(msg)
        tp = (msg.topic, msg.partition)
        seen = batch.offsets.get(tp)
        first = msg.offset if seen is None else min(seen.first, msg.offset)
        after = msg.offset + 1 if seen is None else max(seen.next, msg.offset + 1)
        batch.offsets[tp] = OffsetRange(first, after)
    return batch


R = TypeVar("R", bound=Reading)


def newest_per_device(readings: Iterable[R]) -> list[R]:
    """Collapse to one reading per device: the newest timestamp wins (first seen on a tie)."""
    newest: dict[str, R] = {}
    for reading in readings:
        held = newest.get(reading.device_id)
        if held is None or reading.timestamp > held.timestamp:
            newest[reading.device_id] = reading
    return list(newest.values())
