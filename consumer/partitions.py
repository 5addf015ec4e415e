"""This member's book of partitions: what it may read and commit, and how far it got.

A partition goes through these states:

    assigned ──> pending ──claim──> claimed ──> (halted) ──> forgotten when revoked
                    ^                  │
                    └──── set aside ───┘   (its batch was fenced; re-claimed later)

For a claimed partition the book keeps the claim (the fence token its batches commit
with), the position (the next offset to read and stage) and the stored offset (what
PostgreSQL has). A claim, a reset and a set-aside each replace or drop the claim, so
anything read or staged under the one before can be told apart and dropped. The book
does no I/O: the pipeline pauses, seeks and resumes the Kafka client, and feeds the book
what happened; the rebalance listener feeds it assignments and revocations.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping

from aiokafka import TopicPartition

from consumer.batch import OffsetRange
from consumer.metrics import CONSUMER_LAG, PARTITIONS_HALTED
from consumer.store import Claim


class PartitionBook:
    """Claims, positions, stored offsets and halts of this member's partitions.

    Owns the fleet_consumer_lag_records and fleet_partitions_halted gauges. Promises: a
    claimed partition has a position and a stored offset; forgetting a partition
    (revoked, or assigned anew) forgets all of it. Called by the pipeline and, through
    the rebalance listener, by aiokafka.
    """

    def __init__(self) -> None:
        # pending partition -> the monotonic time it may be claimed from (0.0: now)
        self.pending: dict[TopicPartition, float] = {}
        self.claims: dict[TopicPartition, Claim] = {}
        self.halted: dict[TopicPartition, tuple[int, str]] = {}  # -> (offset, error)
        self._position: dict[TopicPartition, int] = {}  # the next offset to read and stage
        self._stored: dict[TopicPartition, int] = {}  # what PostgreSQL has
        self._gaps: dict[TopicPartition, tuple[int, int]] = {}  # gaps already read again

    # --- assignment --------------------------------------------------------------------

    def assigned(self, partitions: Iterable[TopicPartition]) -> None:
        """Newly assigned: pending a claim, whatever was known of them before is stale."""
        for tp in partitions:
            self._forget(tp)
            self.pending[tp] = 0.0

    def revoked(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            self._forget(tp)
            with contextlib.suppress(KeyError):  # no lag reported yet for it
                CONSUMER_LAG.remove(tp.topic, str(tp.partition))

    def _forget(self, tp: TopicPartition) -> None:
        self.pending.pop(tp, None)
        self.claims.pop(tp, None)
        self._position.pop(tp, None)
        self._stored.pop(tp, None)
        self._gaps.pop(tp, None)
        if self.halted.pop(tp, None) is not None:
            self._count_halted(tp.topic)

    # --- claims ------------------------------------------------------------------------

    def due(self, assigned: set[TopicPartition]) -> list[TopicPartition]:
        """The pending partitions to claim now, in claim order (one lock order for every
        member). One that is no longer assigned (set aside while a rebalance took it) is
        dropped: claiming it would fence its new owner."""
        if not self.pending:  # the usual case, checked on every loop
            return []
        for tp in self.pending.keys() - assigned:
            del self.pending[tp]
        now = time.monotonic()
        return sorted(tp for tp, not_before in self.pending.items() if not_before <= now)

    def claimed(self, tp: TopicPartition, claim: Claim, start: int) -> None:
        """Claimed, the client seeked to `start`: read and stored from there on."""
        self.pending.pop(tp, None)
        self.claims[tp] = claim
        self._position[tp] = self._stored[tp] = start
        self._gaps.pop(tp, None)

    def reset(self, tp: TopicPartition, start: int) -> None:
        """The stored offset moved to `start` (the log it pointed into is gone); a new claim
        object, so that what was read under the old one is told apart."""
        claim = self.claims[tp]
        self.claimed(tp, Claim(start, claim.fence), start)

    def set_aside(self, tp: TopicPartition, *, assigned: bool, after: float = 0.0) -> None:
        """Forget the claim; if still assigned, claim it again `after` seconds from now
        (unless a rebalance decides first)."""
        self.claims.pop(tp, None)
        if assigned:
            self.pending[tp] = time.monotonic() + after

    def is_current(self, tp: TopicPartition, claim: Claim | None) -> bool:
        return claim is not None and self.claims.get(tp) is claim

    # --- reading and storing -----------------------------------------------------------

    def position(self, tp: TopicPartition) -> int:
        return self._position[tp]

    def read_to(self, tp: TopicPartition, next_offset: int) -> None:
        self._position[tp] = next_offset

    def read_again(self, tp: TopicPartition, read_from: int) -> bool:
        """A read started at `read_from`, past the position: True the first time (read it
        again from the position), False when the broker has shown the same gap twice
        (offsets without records, such as transaction markers): then it is real."""
        gap = (self._position[tp], read_from)
        if self._gaps.get(tp) == gap:
            return False
        self._gaps[tp] = gap
        return True

    def stored(self, tp: TopicPartition) -> int | None:
        return self._stored.get(tp)

    def committed(self, offsets: Mapping[TopicPartition, OffsetRange]) -> None:
        for tp, span in offsets.items():
            if tp in self._stored:  # a partition revoked meanwhile stays forgotten
                self._stored[tp] = span.next

    def stored_offsets(self, assigned: set[TopicPartition]) -> dict[TopicPartition, int]:
        """Stored offsets of the assigned partitions (to mirror to Kafka for lag tooling)."""
        return {tp: self._stored[tp] for tp in assigned if tp in self._stored}

    def stored_past(
        self, highwater: Callable[[TopicPartition], int | None], assigned: set[TopicPartition]
    ) -> set[TopicPartition]:
        """Partitions whose stored offset is past the broker's log end: the log was lost."""
        past = set()
        for tp in assigned:
            end, stored = highwater(tp), self._stored.get(tp)
            if end is not None and stored is not None and stored > end:
                past.add(tp)
        return past

    def report_lag(
        self, highwater: Callable[[TopicPartition], int | None], assigned: set[TopicPartition]
    ) -> None:
        """Records between each partition's high watermark and what PostgreSQL has stored."""
        for tp in assigned:
            end, stored = highwater(tp), self._stored.get(tp)
            if end is not None and stored is not None:
                CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, end - stored))

    # --- halting -----------------------------------------------------------------------

    def halt(self, tp: TopicPartition, error: str) -> int:
        """Stop reading tp at its position (a batch there does not decode); the offset."""
        offset = self._position[tp]
        self.halted[tp] = (offset, error)
        self._count_halted(tp.topic)
        return offset

    def _count_halted(self, topic: str) -> None:
        PARTITIONS_HALTED.labels(topic).set(sum(tp.topic == topic for tp in self.halted))
