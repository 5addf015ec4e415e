"""The harness: the consumer group, the simulator runs, the phases, and the run itself."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pydantic import SecretStr

import scripts.chaos
from consumer.kafka import ensure_topics
from consumer.settings import Settings
from devtools.stack import (
    Broker,
    LocalPostgres,
    fresh_database,
    start_broker,
    start_local_postgres,
)
from scripts.chaos import INTERVAL, PARTITIONS, ROOT, WORK, log
from scripts.chaos.checks import (
    Tally,
    caught_up,
    check_database,
    check_offsets,
    claims,
    report,
    settled,
)
from scripts.chaos.faults import database_faults, kill_loop
from scripts.chaos.runs import Group, Run

# While PostgreSQL is down the members hold paused partitions: at most one fetch
# (fetch_max_bytes, 16 MiB) and the batches in flight. More growth than this is a leak.
OUTAGE_RSS_GROWTH_LIMIT_MIB = 64


class Timeline:
    """Hands out consecutive, disjoint time windows (ending before now) to the runs."""

    def __init__(self, total_rounds: int) -> None:
        self.now = datetime.now(UTC).replace(second=0, microsecond=0)
        self.next_start = self.now - (total_rounds + 10) * INTERVAL

    def run(self, name: str, seed: int, rounds: int, topics: str, devices: int) -> Run:
        run = Run(name, seed, self.next_start, rounds, topics, self.now, devices)
        self.next_start += rounds * INTERVAL
        return run


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
    rss_before = {m.member: m.sample_rss() for m in ctx.group.members.values()}
    log(f"{label}: PostgreSQL down while {rounds * 2 * devices:,} readings arrive")
    publishing = asyncio.create_task(run.publish(ctx.settings, ctx.args.rate))
    await asyncio.sleep(5)
    await asyncio.to_thread(ctx.pg.stop, "fast")
    peak = dict(rss_before)
    down_until = time.monotonic() + seconds
    while time.monotonic() < down_until:
        for member in ctx.group.members.values():
            peak[member.member] = max(peak.get(member.member, 0), member.sample_rss())
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


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.chaos",
        description=scripts.chaos.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
