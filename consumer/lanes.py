"""Write lanes: batch transactions in flight side by side, each on its own partitions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

from consumer.batch import Batch
from consumer.store import Claim

# A lane's stage: partition -> (the claim its records were read under, their decoded chunk).
Staged = tuple[TopicPartition, Claim, Batch]


@dataclass(slots=True)
class Lane:
    """At most one transaction in flight, and the next batch growing in its stage."""

    writing: asyncio.Task[None] | None = None
    staged: dict[TopicPartition, tuple[Claim, Batch]] = field(default_factory=dict)
    staged_records: int = 0
    staged_since: float = 0.0  # perf_counter of the first record staged
    decode_seconds: float = 0.0

    def busy(self) -> bool:
        return self.writing is not None and not self.writing.done()

    def stage(self, tp: TopicPartition, claim: Claim, chunk: Batch, *, started: float) -> None:
        """Add a partition's next records (contiguous with what is staged of it)."""
        if not self.staged:
            self.staged_since = started
        self.decode_seconds += time.perf_counter() - started
        held = self.staged.get(tp)
        if held is None or held[0] is not claim:
            self.drop(tp)
            self.staged[tp] = (claim, chunk)
        else:
            held[1].extend(chunk)
        self.staged_records += len(chunk)

    def take(self) -> list[Staged]:
        """Everything staged, emptying the stage."""
        chunks = [(tp, claim, chunk) for tp, (claim, chunk) in self.staged.items()]
        self.staged.clear()
        self.staged_records = 0
        self.decode_seconds = 0.0
        return chunks

    def drop(self, tp: TopicPartition) -> None:
        held = self.staged.pop(tp, None)
        if held is not None:
            self.staged_records -= len(held[1])


class Lanes:
    """FLEET_WRITE_LANES lanes. A partition always belongs to the same lane, so its batches
    commit in order; lanes write in parallel while the loop reads and decodes."""

    def __init__(self, count: int, topics: Sequence[str], limit: int) -> None:
        self._lanes = [Lane() for _ in range(count)]
        self._topic_index = {topic: i for i, topic in enumerate(topics)}
        self.limit = limit  # FLEET_BATCH_MAX_RECORDS: the most a lane stages

    def of(self, tp: TopicPartition) -> Lane:
        index: int = (tp.partition + self._topic_index[tp.topic]) % len(self._lanes)
        return self._lanes[index]

    def __iter__(self) -> Iterator[Lane]:
        return iter(self._lanes)

    def room(self, tp: TopicPartition) -> int:
        return self.limit - self.of(tp).staged_records

    def writes(self) -> set[asyncio.Future[Any]]:
        """The transactions in flight."""
        return {lane.writing for lane in self._lanes if lane.writing and not lane.writing.done()}

    def busy(self) -> bool:
        """Anything in flight or staged."""
        return any(lane.busy() or lane.staged for lane in self._lanes)
