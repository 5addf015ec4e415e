"""Records as batches: decoded readings, rejects, offset ranges. Pure.

A lane stages each partition's records as they arrive, decoded into a chunk
(a Batch of one partition, see decode_partition); when the lane is free its
chunks are merged into the batch it writes (Batch.merged).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from aiokafka import TopicPartition

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
    """Offsets of one partition in the batch; ``next`` is what gets stored. ``newest`` is
    the newest event time among its readings: the partition's progress in event time,
    from which the sessions worker takes its watermark."""

    first: int
    next: int
    newest: datetime | None = None

    def then(self, later: OffsetRange) -> OffsetRange:
        """This range followed by a later one of the same partition."""
        newest = max((t for t in (self.newest, later.newest) if t is not None), default=None)
        return OffsetRange(self.first, later.next, newest)


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
    offsets: dict[TopicPartition, OffsetRange] = field(default_factory=dict)

    def __len__(self) -> int:
        return sum(len(r) for r in self.readings.values()) + len(self.dead_letters)

    def extend(self, other: Batch) -> None:
        """Append a later batch; a partition in both spans from the first's start to the
        second's end (a partition's chunks arrive in offset order)."""
        for stream in Stream:
            self.readings[stream].extend(other.readings[stream])
            self.sources[stream].extend(other.sources[stream])
        self.dead_letters.extend(other.dead_letters)
        for tp, span in other.offsets.items():
            held = self.offsets.get(tp)
            self.offsets[tp] = span if held is None else held.then(span)

    @classmethod
    def merged(cls, batches: Iterable[Batch]) -> Batch:
        merged = cls()
        for batch in batches:
            merged.extend(batch)
        return merged


def build_batch(
    messages: Iterable[Message],
    stream_of_topic: Mapping[str, Stream | None],
    *,
    now: datetime,
    limits: Limits,
) -> Batch:
    """Decode every message; a topic mapped to None is the mixed topic (shape-detected)."""
    by_partition: dict[TopicPartition, list[Message]] = {}
    for msg in messages:
        by_partition.setdefault(TopicPartition(msg.topic, msg.partition), []).append(msg)
    return Batch.merged(
        decode_partition(records, stream_of_topic[topic], now=now, limits=limits)
        for (topic, _), records in by_partition.items()
    )


def decode_partition(
    records: Sequence[Message], expected: Stream | None, *, now: datetime, limits: Limits
) -> Batch:
    """One partition's records as a chunk: each a reading or a dead letter, and the
    offset range from the lowest to one past the highest."""
    chunk = Batch()
    readings, sources, letters = chunk.readings, chunk.sources, chunk.dead_letters
    for msg in records:
        result = decode(msg.value, expected, now=now, limits=limits)
        if isinstance(result, Rejection):
            letters.append(dead_letter(msg, result))
        else:
            stream = Stream.METER if isinstance(result, MeterReading) else Stream.VEHICLE
            readings[stream].append(result)
            sources[stream].append(msg)
    if records:
        offsets = [msg.offset for msg in records]
        head = records[0]
        tp = TopicPartition(head.topic, head.partition)
        newest = max((r.timestamp for rs in readings.values() for r in rs), default=None)
        chunk.offsets[tp] = OffsetRange(min(offsets), max(offsets) + 1, newest)
    return chunk
