"""A stream subscriber's queue: what it is offered, and when it is dropped."""

from __future__ import annotations

import asyncio

from consumer import metrics
from consumer.api.stream import Audience, Event, Interest, Subscriber

V1 = Event("live", "{}", vehicles=frozenset({"v-1"}))
M1 = Event("live", "{}", meters=frozenset({"m-1"}))
ALERT_V1 = Event("alert", "{}", vehicles=frozenset({"v-1"}), meters=frozenset({"v-1"}))


def subscriber(kinds: set[str], vehicles: set[str], size: int = 10) -> Subscriber:
    interest = Interest(frozenset(kinds), frozenset(vehicles), frozenset())
    return Subscriber(interest, "token:0", asyncio.Queue(size))


def test_a_subscriber_is_offered_only_the_kinds_and_devices_it_asked_for() -> None:
    probe = subscriber({"live"}, {"v-1"})
    probe.offer("1:1:", [V1, M1, ALERT_V1])
    assert probe.queue.get_nowait() == ("1:1:", [V1])
    everything = subscriber({"live", "alert"}, set())
    everything.offer("2:2:", [V1, M1, ALERT_V1])
    assert everything.queue.get_nowait() == ("2:2:", [V1, M1, ALERT_V1])
    probe.offer("3:3:", [M1])  # nothing for it: nothing queued
    assert probe.queue.empty()


def test_a_subscriber_whose_backlog_overflows_is_dropped_and_counted() -> None:
    slow = subscriber({"live"}, set(), size=2)
    before = metrics.STREAM_DROPPED.labels("queue_full")._value.get()
    for position in ("1:1:", "2:2:", "3:3:"):
        slow.offer(position, [V1])
    assert slow.dropped == "queue_full"
    assert slow.queue.get_nowait() is None  # the backlog is discarded; the pump stops
    assert metrics.STREAM_DROPPED.labels("queue_full")._value.get() == before + 1
    slow.offer("4:4:", [V1])  # a dropped subscriber takes nothing more
    assert slow.queue.empty()


def test_the_audience_delivers_each_event_to_those_who_follow_its_device_or_everything() -> None:
    audience = Audience()
    probe, everything, meters = (
        subscriber({"live", "alert"}, {"v-1"}),
        subscriber({"live"}, set()),
        Subscriber(
            Interest(frozenset({"live"}), frozenset(), frozenset({"m-1"})),
            "peer:x",
            asyncio.Queue(),
        ),
    )
    for s in (probe, everything, meters):
        audience.add(s)
    assert audience.devices() == (None, None)  # someone follows everything
    audience.deliver("1:1:", [V1, M1, ALERT_V1])
    assert probe.queue.get_nowait() == ("1:1:", [V1, ALERT_V1])
    assert everything.queue.get_nowait() == ("1:1:", [V1, M1])
    assert meters.queue.get_nowait() == ("1:1:", [M1])

    audience.remove(everything)
    assert audience.devices() == (["v-1"], ["m-1"])
    assert audience.per_client == {"token:0": 1, "peer:x": 1}
    assert audience.size == 2
