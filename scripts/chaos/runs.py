"""The chaos run's actors: the consumer group as the harness drives it, and the simulator runs
whose readings must all land."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from consumer.settings import Settings
from devtools.processes import ConsumerProcess
from devtools.stack import settings_env
from producer_sim.__main__ import publish
from producer_sim.faults import Faults, Truth
from producer_sim.fleet import Fleet
from scripts.chaos import INTERVAL, WORK

FAULTS = Faults(bad_messages=0.005, duplicates=0.005, late=0.005, skewed_devices=0.01)


# --- the group of consumer processes ---------------------------------------------------


class Group:
    """The consumer group as the harness sees it: members by slot, restarts counted."""

    def __init__(self, settings: Settings) -> None:
        self.env = settings_env(settings)
        self.members: dict[int, ConsumerProcess] = {}
        self.wanted: set[int] = set()  # slots that should run: the killer restarts only these
        self.retired: list[ConsumerProcess] = []
        self.started = 0

    def start(self, slot: int) -> ConsumerProcess:
        if slot in self.members:  # already running: one process a slot
            return self.members[slot]
        self.wanted.add(slot)
        self.started += 1
        log_path = WORK / f"consumer-{slot}-{self.started}.log"
        member = ConsumerProcess(self.env, log_path, "--role", "ingest")
        self.members[slot] = member
        return member

    def kill(self, slot: int) -> None:
        member = self.members.pop(slot)
        member.kill()
        self.retired.append(member)

    async def stop(self, slot: int) -> None:
        member = self.members.pop(slot)
        await member.stop()
        self.retired.append(member)

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(slot) for slot in list(self.members)))

    def signal(self, sig: signal.Signals) -> None:
        for member in self.members.values():
            member.signal(sig)

    def all(self) -> list[ConsumerProcess]:
        return [*self.retired, *self.members.values()]

    def peak_rss_mib(self) -> float:
        return max((m.peak_rss_kib for m in self.all()), default=0) / 1024

    def events(self, name: str) -> int:
        return sum(len(m.events(name)) for m in self.all())

    async def sample_memory(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for member in list(self.members.values()):
                member.sample_rss()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)


# --- published runs and what they must leave in PostgreSQL -------------------------------


@dataclass
class Run:
    """One simulator run: the same arguments give the same messages, so its expected
    history can be recomputed without keeping a million readings in memory."""

    name: str
    seed: int
    start: datetime
    rounds: int
    topics: str  # "mixed" or "dedicated"
    now: datetime
    devices: int
    truth: Truth = field(default_factory=Truth)

    def fleet(self) -> Fleet:
        return Fleet(self.devices, self.devices, self.seed)

    async def publish(self, settings: Settings, rate: float) -> None:
        await publish(
            settings.kafka_bootstrap_servers,
            self.fleet(),
            self.start,
            INTERVAL,
            self.rounds,
            self.topics,
            settings.meter_topic,
            settings.vehicle_topic,
            settings.mixed_topic,
            False,  # tansu has no idempotent producer
            faults=FAULTS,
            truth=self.truth,
            now=self.now,
            rate=rate,
        )

    def expected(self) -> Iterator[tuple[str, str, datetime]]:
        """(kind, device, timestamp) of every valid reading: one per device per round,
        stamped start + k * interval, shifted by the skew of a skewed device's clock
        (which publish() recorded in the truth)."""
        fleet = self.fleet()
        skew = {d: timedelta(seconds=s) for d, s in self.truth.skewed_devices.items()}
        for k in range(self.rounds):
            ts = self.start + k * INTERVAL
            for kind, ids in (("meter", fleet.meter_ids), ("vehicle", fleet.vehicle_ids)):
                for device in ids:
                    yield kind, device, ts + skew[device] if device in skew else ts
