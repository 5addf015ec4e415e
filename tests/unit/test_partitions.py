"""The partition book: claims, positions, stored offsets and halts, without any I/O."""

from __future__ import annotations

from aiokafka import TopicPartition
from prometheus_client import REGISTRY

from consumer.batch import OffsetRange
from consumer.partitions import PartitionBook
from consumer.store import Claim

A, B, C = (TopicPartition("fleet", p) for p in range(3))


def claimed_book(*partitions: TopicPartition) -> PartitionBook:
    book = PartitionBook()
    book.assigned(partitions)
    for tp in partitions:
        book.claimed(tp, Claim(10, fence=1), 10)
    return book


def test_assigned_partitions_are_due_for_a_claim_in_one_order() -> None:
    """Every member claims in the same order (no deadlocks between their claims)."""
    book = PartitionBook()
    book.assigned([C, A, B])
    assert book.due({A, B, C}) == [A, B, C]


def test_a_pending_partition_no_longer_assigned_is_never_claimed() -> None:
    """Claiming a partition the group moved away would fence its new owner."""
    book = PartitionBook()
    book.assigned([A, B])
    assert book.due({B}) == [B]
    assert A not in book.pending


def test_a_claim_sets_where_reading_and_storing_resume() -> None:
    book = claimed_book(A)
    assert (book.position(A), book.stored(A)) == (10, 10)
    assert A not in book.pending


def test_a_partition_set_aside_is_claimed_again_only_after_its_wait() -> None:
    """After a fenced batch: no claim until the group has had time to decide."""
    book = claimed_book(A)
    claim = book.claims[A]
    book.set_aside(A, assigned=True, after=60)
    assert not book.is_current(A, claim)
    assert book.due({A}) == []
    book.set_aside(B, assigned=False)
    assert B not in book.pending


def test_a_reset_is_a_new_claim_so_what_was_read_before_is_told_apart() -> None:
    book = claimed_book(A)
    before = book.claims[A]
    book.reset(A, 0)
    assert not book.is_current(A, before)
    assert book.claims[A].fence == before.fence
    assert (book.position(A), book.stored(A)) == (0, 0)


def test_a_gap_is_read_again_once_then_taken_as_real() -> None:
    """A read starting past the position is read again; the same gap twice is the broker's."""
    book = claimed_book(A)
    assert book.read_again(A, 15)
    assert not book.read_again(A, 15)
    book.read_to(A, 20)
    assert book.read_again(A, 25)  # another gap, further on


def test_revoking_forgets_everything_and_a_late_commit_does_not_revive_it() -> None:
    book = claimed_book(A, B)
    book.revoked([A])
    assert A not in book.claims and book.stored(A) is None
    book.committed({A: OffsetRange(10, 20), B: OffsetRange(10, 30)})
    assert book.stored(A) is None
    assert book.stored(B) == 30
    assert book.stored_offsets({A, B}) == {B: 30}


def test_stored_offsets_past_the_log_end_are_found() -> None:
    """A broker that lost its log shows a high watermark below what was stored."""
    book = claimed_book(A, B)
    ends = {A: 5, B: 50}
    assert book.stored_past(ends.get, {A, B}) == {A}


def test_halting_records_the_offset_and_the_gauge_counts_per_topic() -> None:
    book = claimed_book(A, B)
    book.read_to(A, 42)
    assert book.halt(A, "DecompressionError") == 42
    assert book.halted[A] == (42, "DecompressionError")
    assert REGISTRY.get_sample_value("fleet_partitions_halted", {"topic": "fleet"}) == 1
    book.assigned([A])  # assigned anew: halted no more, until it fails again
    assert REGISTRY.get_sample_value("fleet_partitions_halted", {"topic": "fleet"}) == 0
