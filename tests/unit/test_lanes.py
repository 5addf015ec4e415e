"""Write lanes: a partition always in the same lane; what a lane stages, and its room."""

from __future__ import annotations

import time

from aiokafka import TopicPartition

from consumer.batch import Batch, OffsetRange
from consumer.lanes import Lanes
from consumer.models import Stream
from consumer.store import Claim

TOPICS = ["meter", "vehicle", "fleet"]


def chunk(tp: TopicPartition, first: int, n: int) -> Batch:
    batch = Batch()
    batch.offsets[tp] = OffsetRange(first, first + n)
    batch.readings[Stream.METER].extend([None] * n)  # type: ignore[list-item]  # only counted
    return batch


def test_a_partition_always_maps_to_the_same_lane_and_all_lanes_are_used() -> None:
    lanes = Lanes(2, TOPICS, limit=100)
    partitions = [TopicPartition(t, p) for t in TOPICS for p in range(4)]
    assert all(
        lanes.of(tp) is lanes.of(TopicPartition(tp.topic, tp.partition)) for tp in partitions
    )
    assert {id(lanes.of(tp)) for tp in partitions} == {id(lane) for lane in lanes}


def test_staging_fills_the_room_and_taking_empties_it() -> None:
    lanes = Lanes(1, TOPICS, limit=100)
    tp, claim = TopicPartition("fleet", 0), Claim(0, 1)
    lane = lanes.of(tp)
    lane.stage(tp, claim, chunk(tp, 0, 30), started=time.perf_counter())
    lane.stage(tp, claim, chunk(tp, 30, 20), started=time.perf_counter())
    assert lanes.room(tp) == 50
    [(taken_tp, taken_claim, taken)] = lane.take()
    assert (taken_tp, taken_claim, taken.offsets[tp]) == (tp, claim, OffsetRange(0, 50))
    assert lanes.room(tp) == 100 and not lanes.busy()


def test_records_of_another_claim_replace_what_was_staged_under_the_old_one() -> None:
    lanes = Lanes(1, TOPICS, limit=100)
    tp = TopicPartition("fleet", 0)
    lane = lanes.of(tp)
    lane.stage(tp, Claim(0, 1), chunk(tp, 0, 30), started=time.perf_counter())
    lane.stage(tp, Claim(0, 2), chunk(tp, 0, 10), started=time.perf_counter())
    assert lane.staged_records == 10
    lane.drop(tp)
    assert lane.staged_records == 0 and not lane.staged
