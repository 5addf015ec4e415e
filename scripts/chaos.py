"""`make chaos`: the platform's promises under faults, as figures anyone can reproduce.

Runs on this machine's own stand-ins: a tansu broker and a private PostgreSQL server
(scratch data in .chaos/) that this script may crash, with 2-3 consumer processes
(`python -m consumer run --role ingest`). Phases:

1. soak: >= 1,000,000 valid readings from the simulator, with bad messages, re-sent
   duplicates, late readings and skewed clocks switched on, into the mixed topic and
   the dedicated topics (8 partitions each), paced so they keep arriving while the
   harness SIGKILLs a random consumer every 5-15 s (restarting it 0-5 s later), scales
   the group to three members and back, crashes PostgreSQL (immediate stop, restarted
   at once, during writes), restarts it (fast stop, down for 5 s) and terminates the
   consumers' backends in the middle of their batch transactions;
2. outage: PostgreSQL down for --outage-seconds (120) while readings keep arriving: no
   member may leave the group (no partition re-claimed), memory stays bounded, then
   everything is caught up;
3. outage past max.poll.interval.ms: the same with members running at 20 s;
4. broker restart: the broker comes back empty (topics recreated, offsets start over):
   the members must alert (log line and fleet_offset_resets_total) and resume;
5. the fast proofs of `make test`: bad-input corpus, zombie, API fuzz with auth.

Then it compares what PostgreSQL holds with what was published: history rows against
the distinct valid readings as sets of (device, timestamp), duplicates, every live row
against its device's newest reading, dead letters by reason against the injected bad
messages, stored offsets against every partition's log end. It prints the faults
injected and the anomalies found; the exit status is 1 if any anomaly is not zero.
Broker, database, consumers and this harness share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import SecretStr

from consumer.devstack import (
    Broker,
    LocalPostgres,
    free_port,
    fresh_database,
    settings_env,
    start_broker,
    start_local_postgres,
)
from consumer.kafka import ensure_topics
from consumer.settings import Settings
from producer_sim.__main__ import publish
from producer_sim.faults import Faults, Truth
from producer_sim.fleet import Fleet

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".chaos"
PARTITIONS = 8
INTERVAL = timedelta(minutes=1)
FAULTS = Faults(bad_messages=0.005, duplicates=0.005, late=0.005, skewed_devices=0.01)
# While PostgreSQL is down the members hold paused partitions: at most one fetch
# (fetch_max_bytes, 16 MiB) and the batches in flight. More growth than this is a leak.
OUTAGE_RSS_GROWTH_LIMIT_MIB = 64


def log(message: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", flush=True)


# --- the group of consumer processes ---------------------------------------------------


class Member:
    """One `python -m consumer run --role ingest` process, with its log and memory peak."""

    def __init__(self, env: dict[str, str], name: str) -> None:
        self.name = name
        self.port = free_port()
        self.log_path = WORK / f"{name}.log"
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "consumer", "run", "--role", "ingest"],
                env=env | {"FLEET_HTTP_PORT": str(self.port)},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.peak_rss_kib = 0

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss_kib(self) -> int:
        """Current resident memory; the lifetime peak (VmHWM) is kept in peak_rss_kib."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return 0
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        rss = int(fields.get("VmRSS", "0 kB").split()[0])
        self.peak_rss_kib = max(self.peak_rss_kib, int(fields.get("VmHWM", "0 kB").split()[0]))
        return rss

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    async def stop(self, timeout: float = 30) -> None:
        """SIGTERM: leave the group cleanly (SIGKILL if it takes longer than timeout)."""
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.process.wait, timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def events(self, name: str) -> int:
        return self.log_path.read_text(errors="replace").count(f'"event": "{name}"')


class Group:
    """The consumer group as the harness sees it: members by slot, restarts counted."""

    def __init__(self, settings: Settings) -> None:
        self.env = settings_env(settings)
        self.members: dict[int, Member] = {}
        self.wanted: set[int] = set()  # slots that should run: the killer restarts only these
        self.retired: list[Member] = []
        self.started = 0

    def start(self, slot: int) -> Member:
        if slot in self.members:  # already running: one process a slot
            return self.members[slot]
        self.wanted.add(slot)
        self.started += 1
        member = Member(self.env, f"consumer-{slot}-{self.started}")
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
            with contextlib.suppress(ProcessLookupError):
                member.process.send_signal(sig)

    def all(self) -> list[Member]:
        return [*self.retired, *self.members.values()]

    def peak_rss_mib(self) -> float:
        return max((m.peak_rss_kib for m in self.all()), default=0) / 1024

    def events(self, name: str) -> int:
        return sum(m.events(name) for m in self.all())

    async def sample_memory(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for member in list(self.members.values()):
                member.rss_kib()
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


class Timeline:
    """Hands out consecutive, disjoint time windows (ending before now) to the runs."""

    def __init__(self, total_rounds: int) -> None:
        self.now = datetime.now(UTC).replace(second=0, microsecond=0)
        self.next_start = self.now - (total_rounds + 10) * INTERVAL

    def run(self, name: str, seed: int, rounds: int, topics: str, devices: int) -> Run:
        run = Run(name, seed, self.next_start, rounds, topics, self.now, devices)
        self.next_start += rounds * INTERVAL
        return run


# --- faults ------------------------------------------------------------------------------


@dataclass
class Tally:
    faults: Counter[str] = field(default_factory=Counter)
    anomalies: dict[str, int] = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)


async def kill_loop(group: Group, tally: Tally, stop: asyncio.Event) -> None:
    """SIGKILL a random member every 5-15 s; restart it 0-5 s later."""
    rng = random.Random(7)  # noqa: S311 -- a reproducible schedule
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.uniform(5, 15))
        if stop.is_set() or not group.members:
            return
        slot = rng.choice(sorted(group.members))
        group.kill(slot)
        tally.faults["consumer SIGKILLed"] += 1
        await asyncio.sleep(rng.uniform(0, 5))
        if slot in group.wanted:  # not scaled away meanwhile
            group.start(slot)
            tally.faults["consumer restarted after SIGKILL"] += 1


async def terminate_mid_transaction(dsn: str, tally: Tally, timeout: float = 20) -> None:
    """pg_terminate_backend on the consumers' backends while a batch write is running."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'fleet-consumer%' "
                "AND state = 'active' AND query LIKE '%fleet_write_batch%'"
            )
            if pids:
                for row in pids:
                    if await conn.fetchval("SELECT pg_terminate_backend($1)", row["pid"]):
                        tally.faults["backend terminated mid-transaction"] += 1
                return
            await asyncio.sleep(0.005)
        log("no batch transaction in flight to terminate")
    finally:
        await conn.close()


async def database_faults(pg: LocalPostgres, dsn: str, group: Group, tally: Tally) -> None:
    """The soak's schedule of PostgreSQL faults and scaling (seconds from its start)."""
    await asyncio.sleep(20)
    await asyncio.to_thread(pg.stop, "immediate")  # a crash during writes, restarted at once
    await asyncio.to_thread(pg.start)
    tally.faults["PostgreSQL crashed (immediate stop) and restarted at once"] += 1
    await asyncio.sleep(10)
    group.start(3)
    tally.faults["group scaled up to 3"] += 1
    await asyncio.sleep(10)
    await terminate_mid_transaction(dsn, tally)
    await asyncio.sleep(15)
    await asyncio.to_thread(pg.stop, "fast")
    await asyncio.sleep(5)
    await asyncio.to_thread(pg.start)
    tally.faults["PostgreSQL restarted (fast stop, 5 s down)"] += 1
    await asyncio.sleep(15)
    group.wanted.discard(3)
    if 3 in group.members:  # else the killer has it down, and will not restart it
        await group.stop(3)
    tally.faults["group scaled down to 2 (SIGTERM)"] += 1
    await asyncio.sleep(10)
    await terminate_mid_transaction(dsn, tally)


# --- checks ------------------------------------------------------------------------------


async def log_end_offsets(settings: Settings) -> dict[tuple[str, int], int]:
    """The offset after each partition's last record.

    ListOffsets answers it on Kafka; tansu answers the last batch's base offset instead,
    so the records from there on are read to find the true end (on Kafka: none).
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in settings.topics for p in range(PARTITIONS)]
        ends = await consumer.end_offsets(tps)
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, ends[tp])
        while fetched := await consumer.getmany(timeout_ms=1000):
            for tp, records in fetched.items():
                ends[tp] = max(ends[tp], records[-1].offset + 1)
        return {(tp.topic, tp.partition): offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


async def stored_offsets(dsn: str, group_id: str) -> dict[tuple[str, int], int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            'SELECT topic, "partition", next_offset FROM consumer_offsets WHERE group_id = $1',
            group_id,
        )
    finally:
        await conn.close()
    return {(r["topic"], r["partition"]): r["next_offset"] or 0 for r in rows}


async def caught_up(settings: Settings, dsn: str, timeout: float) -> float | None:
    """Seconds until every partition's stored offset reached its log end; None if never.
    Called once everything is published: the log ends stand still meanwhile."""
    began = time.monotonic()
    ends = await log_end_offsets(settings)
    while time.monotonic() - began < timeout:
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            stored = await stored_offsets(dsn, settings.group_id)
            if all(stored.get(tp, 0) == end for tp, end in ends.items()):
                return time.monotonic() - began
        await asyncio.sleep(1)
    return None


async def settled(dsn: str, group: Group, quiet: float = 8, timeout: float = 300) -> bool:
    """Wait until every partition is claimed by a running member and none was claimed for
    `quiet` seconds: the group is stable. False if that did not happen within timeout.
    (tansu can take minutes to let new members in after others left.)"""
    members = {f"-{m.process.pid}" for m in group.members.values()}
    began = last_change = time.monotonic()
    seen = await claims(dsn)
    while time.monotonic() - began < timeout:
        await asyncio.sleep(1)
        now = await claims(dsn)
        if now != seen:
            seen, last_change = now, time.monotonic()
        owned = all(owner.endswith(tuple(members)) for _, owner in now.values())
        if owned and time.monotonic() - last_change >= quiet:
            return True
    return False


async def claims(dsn: str) -> dict[tuple[str, int], tuple[int, str]]:
    """(fence, owner) of every partition."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch('SELECT topic, "partition", fence, owner FROM consumer_offsets')
    finally:
        await conn.close()
    return {(r["topic"], r["partition"]): (r["fence"], r["owner"]) for r in rows}


_HISTORY = {  # kind -> (history, live, id column, value columns)
    "meter": ("meter_history", "meter_live", "meter_id", ("kwh_consumed_ac", "voltage")),
    "vehicle": (
        "vehicle_history",
        "vehicle_live",
        "vehicle_id",
        ("soc", "kwh_delivered_dc", "battery_temp"),
    ),
}


def _row(alias: str, columns: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"{alias}.{c}" for c in columns) + ")"


async def check_database(dsn: str, runs: list[Run], tally: Tally) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TEMP TABLE expected (kind text, device text, ts timestamptz)")
        chunk: list[tuple[str, str, datetime]] = []
        for run in runs:
            for row in run.expected():
                chunk.append(row)
                if len(chunk) == 100_000:
                    await conn.copy_records_to_table("expected", records=chunk)
                    chunk.clear()
        await conn.copy_records_to_table("expected", records=chunk)
        await conn.execute("CREATE INDEX ON expected (kind, device, ts)")
        await conn.execute("ANALYZE expected")
        anomalies = Counter[str]()
        for kind, (history, live, id_col, values) in _HISTORY.items():
            keys = f'SELECT {id_col}, "timestamp" FROM {history}'
            wanted = f"SELECT device, ts FROM expected WHERE kind = '{kind}'"
            anomalies["valid readings missing from history"] += await conn.fetchval(
                f"SELECT count(*) FROM ({wanted} EXCEPT {keys}) missing"
            )
            anomalies["history rows that are no valid reading"] += await conn.fetchval(
                f"SELECT count(*) FROM ({keys} EXCEPT {wanted}) unexpected"
            )
            anomalies["duplicate history rows"] += await conn.fetchval(
                f'SELECT count(*) - count(DISTINCT ({id_col}, "timestamp")) FROM {history}'
            )
            anomalies["live rows not the newest reading"] += await conn.fetchval(
                f"""SELECT count(*) FROM (SELECT device, max(ts) AS ts FROM expected
                                          WHERE kind = '{kind}' GROUP BY device) newest
                    FULL JOIN {live} l ON l.{id_col} = newest.device
                    WHERE l."timestamp" IS DISTINCT FROM newest.ts"""
            )
            anomalies["live values differing from their history row"] += await conn.fetchval(
                f"""SELECT count(*) FROM {live} l LEFT JOIN {history} h
                      ON h.{id_col} = l.{id_col} AND h."timestamp" = l."timestamp"
                    WHERE h.{id_col} IS NULL
                       OR {_row("h", values)} IS DISTINCT FROM {_row("l", values)}"""
            )
        got = dict(await conn.fetch("SELECT reason, count(*) FROM dead_letters GROUP BY 1"))
        injected = Counter[str]()
        for run in runs:
            injected.update(run.truth.bad_messages)
        anomalies["dead letters differing from injected bad messages (by reason)"] = sum(
            abs(got.get(reason, 0) - injected.get(reason, 0)) for reason in {*got, *injected}
        )
        tally.anomalies.update(anomalies)
        history = await conn.fetchval(
            "SELECT (SELECT count(*) FROM meter_history) + (SELECT count(*) FROM vehicle_history)"
        )
        tally.figures["history rows checked"] = f"{history:,}"
        tally.figures["dead letters checked"] = f"{sum(got.values()):,}"
    finally:
        await conn.close()


async def check_offsets(settings: Settings, dsn: str, tally: Tally) -> None:
    ends = await log_end_offsets(settings)
    stored = await stored_offsets(dsn, settings.group_id)
    tally.anomalies["partitions whose stored offset is not the log end"] = sum(
        stored.get(tp, 0) != end for tp, end in ends.items()
    )
    tally.figures["partitions checked"] = str(len(ends))


# --- phases ------------------------------------------------------------------------------


async def soak(ctx: Context, readings: int) -> None:
    devices = 2_500
    rounds = max(1, readings // 2 // (2 * devices))  # half mixed, half dedicated
    runs = [
        ctx.timeline.run("soak-mixed", 11, rounds, "mixed", devices),
        ctx.timeline.run("soak-dedicated", 12, rounds, "dedicated", devices),
    ]
    ctx.runs += runs
    rate = ctx.args.rate
    log(f"soak: {2 * rounds * 2 * devices:,} readings at {2 * rate:,.0f} messages/s, 2 members")
    for slot in (1, 2):
        ctx.group.start(slot)
    stop = asyncio.Event()
    killer = asyncio.create_task(kill_loop(ctx.group, ctx.tally, stop))
    database = asyncio.create_task(database_faults(ctx.pg, ctx.dsn, ctx.group, ctx.tally))
    await asyncio.gather(*(run.publish(ctx.settings, rate) for run in runs))
    await database  # its schedule is shorter than the publishing; a long run waits here
    stop.set()
    await killer
    for run in runs:
        ctx.tally.faults["bad messages injected"] += sum(run.truth.bad_messages.values())
        ctx.tally.faults["duplicates re-sent"] += run.truth.duplicates
        ctx.tally.faults["late readings"] += run.truth.late_readings
    await ctx.catch_up("soak")


async def outage(ctx: Context, seconds: float, max_poll_interval_ms: int | None) -> None:
    label = f"outage {seconds:.0f} s" + (
        f" (max.poll.interval.ms={max_poll_interval_ms})" if max_poll_interval_ms else ""
    )
    if max_poll_interval_ms is not None:  # members restarted with the shorter interval
        await ctx.group.stop_all()
        ctx.group.env["FLEET_MAX_POLL_INTERVAL_MS"] = str(max_poll_interval_ms)
        for slot in (1, 2):
            ctx.group.start(slot)
    stable = await settled(ctx.dsn, ctx.group)  # no rebalance still going on from before
    ctx.tally.anomalies[f"{label}: group not stable before the outage"] = int(not stable)
    devices = 500
    rounds = max(1, int(ctx.args.rate * (seconds + 30) / (2 * devices)))
    run = ctx.timeline.run(label, 20 + len(ctx.runs), rounds, "dedicated", devices)
    ctx.runs.append(run)
    before = await claims(ctx.dsn)
    revoked_before = ctx.group.events("partitions_revoked")
    rss_before = {m.name: m.rss_kib() for m in ctx.group.members.values()}
    log(f"{label}: PostgreSQL down while {rounds * 2 * devices:,} readings arrive")
    publishing = asyncio.create_task(run.publish(ctx.settings, ctx.args.rate))
    await asyncio.sleep(5)
    await asyncio.to_thread(ctx.pg.stop, "fast")
    peak = dict(rss_before)
    down_until = time.monotonic() + seconds
    while time.monotonic() < down_until:
        for member in ctx.group.members.values():
            peak[member.name] = max(peak.get(member.name, 0), member.rss_kib())
        await asyncio.sleep(1)
    alive = sum(m.alive() for m in ctx.group.members.values())
    await asyncio.to_thread(ctx.pg.start)
    ctx.tally.faults[f"PostgreSQL down {seconds:.0f} s while readings arrive"] += 1
    await publishing
    await ctx.catch_up(label)
    ctx.tally.anomalies[f"{label}: members that exited"] = len(ctx.group.members) - alive
    after = await claims(ctx.dsn)
    ctx.tally.anomalies[f"{label}: partitions re-claimed (a member left the group)"] = sum(
        after.get(tp, (None, ""))[0] != fence for tp, (fence, _) in before.items()
    )
    ctx.tally.anomalies[f"{label}: rebalances seen by members"] = (
        ctx.group.events("partitions_revoked") - revoked_before
    )
    growth = max((peak[n] - rss_before[n]) / 1024 for n in rss_before)
    ctx.tally.figures[f"{label}: members' RSS growth while down"] = f"{growth:.1f} MiB"
    ctx.tally.anomalies[f"{label}: RSS growth over {OUTAGE_RSS_GROWTH_LIMIT_MIB} MiB"] = int(
        growth > OUTAGE_RSS_GROWTH_LIMIT_MIB
    )


async def broker_restart(ctx: Context) -> None:
    """The local broker keeps nothing: after a restart every stored offset is past the log end."""
    resets_before = ctx.group.events("offsets_out_of_range")
    log("broker restart: topics recreated empty, offsets start over")
    # tansu creates a topic a client asks about (4 partitions), as Kafka does with
    # auto.create.topics.enable. The members are frozen for the moment it takes to
    # recreate the topics as an operator would (compose turns auto-creation off).
    ctx.group.signal(signal.SIGSTOP)
    ctx.broker.stop()
    ctx.broker.start()
    await ensure_topics(
        ctx.settings.kafka_bootstrap_servers,
        [*ctx.settings.topics, ctx.settings.dlq_topic],
        PARTITIONS,
    )
    ctx.group.signal(signal.SIGCONT)
    ctx.tally.faults["broker restarted empty"] += 1
    devices = 500
    runs = [
        ctx.timeline.run("after broker restart (mixed)", 40, 10, "mixed", devices),
        ctx.timeline.run("after broker restart (dedicated)", 41, 10, "dedicated", devices),
    ]
    ctx.runs += runs
    await asyncio.gather(*(run.publish(ctx.settings, ctx.args.rate) for run in runs))
    await ctx.catch_up("broker restart")
    alerts = ctx.group.events("offsets_out_of_range") - resets_before
    ctx.tally.figures["broker restart: offset-reset alerts logged"] = str(alerts)
    ctx.tally.anomalies["broker restart: partitions never alerted on"] = max(
        0, 3 * PARTITIONS - alerts
    )


def fast_proofs(tally: Tally) -> None:
    """The corpus, zombie and API fuzz tests of `make test`, run here for the report."""
    tests = {
        "bad-input corpus (Kafka and HTTP)": "tests/integration/test_bad_input_corpus.py",
        "zombie (SIGSTOP mid-write)": "tests/integration/test_reliability.py::"
        "test_a_zombie_stopped_mid_write_is_fenced_when_it_wakes",
        "API fuzz (schemathesis, auth on)": "tests/integration/test_openapi.py",
    }
    for name, target in tests.items():
        log(f"fast proof: {name}")
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", target],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        summary = (result.stdout.strip().splitlines() or ["no output"])[-1]
        tally.figures[name] = summary
        tally.anomalies[f"{name}: failed"] = int(result.returncode != 0)


# --- the harness -------------------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    broker: Broker
    pg: LocalPostgres
    dsn: str
    settings: Settings
    group: Group
    timeline: Timeline
    tally: Tally = field(default_factory=Tally)
    runs: list[Run] = field(default_factory=list)

    async def catch_up(self, label: str) -> None:
        for slot in (1, 2):  # a phase ends with the two steady members running
            if slot not in self.group.members:
                self.group.start(slot)
        seconds = await caught_up(self.settings, self.dsn, timeout=self.args.catch_up_timeout)
        took = "never" if seconds is None else f"{seconds:.1f} s"
        self.tally.figures[f"{label}: caught up after the last message"] = took
        self.tally.anomalies[f"{label}: not caught up"] = int(seconds is None)
        log(f"{label}: caught up: {took}")


def report(tally: Tally, seconds: float) -> str:
    width = max(len(k) for k in [*tally.faults, *tally.anomalies, *tally.figures]) + 2
    lines = [
        "",
        "| fault injected".ljust(width + 2) + "| count |",
        "|" + "-" * (width + 1) + "|------:|",
    ]
    lines += [f"| {k}".ljust(width + 2) + f"| {v:>5} |" for k, v in tally.faults.items()]
    lines += ["", "| anomaly".ljust(width + 2) + "| found |", "|" + "-" * (width + 1) + "|------:|"]
    lines += [f"| {k}".ljust(width + 2) + f"| {v:>5} |" for k, v in tally.anomalies.items()]
    lines += ["", "| figure".ljust(width + 2) + "| value", "|" + "-" * (width + 1) + "|------"]
    lines += [f"| {k}".ljust(width + 2) + f"| {v}" for k, v in tally.figures.items()]
    lines += [
        "",
        f"total: {seconds / 60:.1f} min on {os.cpu_count()} cores shared by broker, "
        "PostgreSQL, consumers and harness",
    ]
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> int:
    began = time.monotonic()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    broker = start_broker(WORK)
    pg = start_local_postgres(WORK / "pg")
    group: Group | None = None
    try:
        dsn = await fresh_database(pg.dsn, "fleet")
        settings = Settings(
            kafka_bootstrap_servers=broker.bootstrap_servers,
            database_url=SecretStr(dsn),
            meter_topic="chaos-meter",
            vehicle_topic="chaos-vehicle",
            mixed_topic="chaos-fleet",
            dlq_topic="chaos-dlq",
            group_id="chaos",
            batch_max_records=5_000,
            session_timeout_ms=6_000,
            heartbeat_interval_ms=1_000,
            kafka_idempotent_producer=False,
            retry_max_seconds=2.0,
            http_host="127.0.0.1",
            log_json=True,
        )
        await ensure_topics(
            broker.bootstrap_servers, [*settings.topics, settings.dlq_topic], PARTITIONS
        )
        group = Group(settings)
        extra_rounds = 2_000  # room for the later phases' windows
        timeline = Timeline(args.readings // 5_000 + extra_rounds)
        ctx = Context(args, broker, pg, dsn, settings, group, timeline)
        stop_sampling = asyncio.Event()
        sampler = asyncio.create_task(group.sample_memory(stop_sampling))
        await soak(ctx, args.readings)
        await outage(ctx, args.outage_seconds, None)
        await outage(ctx, args.short_outage_seconds, max_poll_interval_ms=20_000)
        await broker_restart(ctx)
        await group.stop_all()
        stop_sampling.set()
        await sampler
        log("checking what PostgreSQL holds against what was published")
        await check_database(dsn, ctx.runs, ctx.tally)
        await check_offsets(settings, dsn, ctx.tally)
        ctx.tally.figures["valid readings published"] = (
            f"{sum(r.truth.readings for r in ctx.runs):,}"
        )
        ctx.tally.figures["messages published"] = f"{sum(r.truth.messages for r in ctx.runs):,}"
        ctx.tally.figures["consumers' peak RSS"] = f"{group.peak_rss_mib():.0f} MiB"
        for event in ("partitions_claimed", "batch_fenced", "batch_committed"):
            ctx.tally.figures[f"{event} (log events, all members)"] = f"{group.events(event):,}"
        ctx.tally.faults["consumer processes started in all"] = group.started
        if not args.skip_tests:
            fast_proofs(ctx.tally)
        text = report(ctx.tally, time.monotonic() - began)
        print(text)
        (WORK / "report.md").write_text(text + "\n")
        return int(any(ctx.tally.anomalies.values()))
    finally:
        if group is not None:
            for member in group.members.values():
                member.kill()
        broker.stop()
        with contextlib.suppress(subprocess.CalledProcessError):
            pg.stop("immediate")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--readings", type=int, default=1_000_000, help="valid readings in the soak"
    )
    parser.add_argument("--rate", type=float, default=3_500, help="messages/s per publisher")
    parser.add_argument("--outage-seconds", type=float, default=120)
    parser.add_argument("--short-outage-seconds", type=float, default=40)
    parser.add_argument("--catch-up-timeout", type=float, default=240)
    parser.add_argument("--skip-tests", action="store_true", help="skip the fast proofs (phase 5)")
    return parser


if __name__ == "__main__":
    sys.exit(asyncio.run(main(_parser().parse_args())))
