"""One poll's records as a batch: decoded readings, rejects, offset ranges. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

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
    spans: dict[tuple[str, int], list[int]] = {}  # [first, last]
    for msg in messages:
        result = decode(msg.value, stream_of_topic[msg.topic], now=now, limits=limits)
        if isinstance(result, Rejection):
            batch.dead_letters.append(dead_letter(msg, result))
        else:
            stream = Stream.METER if isinstance(result, MeterReading) else Stream.VEHICLE
            batch.readings[stream].append(result)
            batch.sources[stream].append(msg)
        span = spans.get((msg.topic, msg.partition))
        if span is None:
            spans[(msg.topic, msg.partition)] = [msg.offset, msg.offset]
        elif msg.offset < span[0]:
            span[0] = msg.offset
        elif msg.offset > span[1]:
            span[1] = msg.offset
    batch.offsets = {tp: OffsetRange(first, last + 1) for tp, (first, last) in spans.items()}
    return batch
