"""Sessions and alerts against the simulator's truth: `make proof` (a smaller run in the tests).

A simulated fleet with faults (failing chargers, overheating batteries, silent devices,
re-sent, late and bad messages) is published to a local broker and stored by real
consumer processes: `run --role ingest` and `run --role sessions`, each killed with
SIGKILL once mid-run and restarted. Then the platform is checked against the truth file:

- sessions: >= 99% of the truth's finished sessions have a platform session of the same
  vehicle whose start and end are within one reading interval, with an efficiency within
  0.5% of the charger's true one (sessions that straddle a charger's failure excluded);
- charger_efficiency_low: exactly one per failing charger, opened no later than the end
  of its K-th session after the failure; none for a healthy charger;
- battery_overheat and device_silent: the alerted devices are the injected ones;
- every alert transition is in the alerts topic, and deduplicated by id, exactly once.

Prints the figures and a JSON line; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer

from consumer.kafka import ensure_topics
from consumer.settings import Settings
from devtools.processes import ConsumerProcess
from devtools.stack import (
    fresh_database,
    postgres_reachable,
    start_broker,
    start_embedded_postgres,
)
from producer_sim.__main__ import publish
from producer_sim.assignments import write_assignments
from producer_sim.faults import Faults, Truth
from producer_sim.fleet import Fleet

ROOT = Path(__file__).resolve().parent.parent
INTERVAL = timedelta(minutes=1)


@dataclass
class Proof:
    """What was checked, with the counts a reader needs to judge it."""

    figures: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, failure: str) -> None:
        if not ok:
            self.failures.append(failure)


async def prove(
    work: Path, bootstrap: str, admin_dsn: str, *, devices: int, hours: float, database: str
) -> Proof:
    """Publish the faulty fleet, run the processes (each killed once), check; the proof."""
    dsn = await fresh_database(admin_dsn, database)
    run_id = datetime.now(UTC).strftime("%H%M%S%f")  # topics and group of this run alone
    settings = Settings(
        kafka_bootstrap_servers=bootstrap,
        database_url=dsn,  # type: ignore[arg-type]  # a str is validated into a SecretStr
        meter_topic=f"proof-meter-{run_id}",
        vehicle_topic=f"proof-vehicle-{run_id}",
        mixed_topic=f"proof-fleet-{run_id}",
        dlq_topic=f"proof-dlq-{run_id}",
        alerts_topic=f"proof-alerts-{run_id}",
        group_id=f"proof-{run_id}",
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        kafka_idempotent_producer=False,
        log_json=True,
        http_host="127.0.0.1",
        api_auth="off",
    )
    await ensure_topics(bootstrap, [*settings.topics, settings.dlq_topic, settings.alerts_topic], 8)
    rounds = int(hours * 60)
    start = (datetime.now(UTC) - timedelta(hours=hours + 1)).replace(second=0, microsecond=0)
    fleet = Fleet(devices, devices, seed=7)
    await write_assignments(dsn, fleet.charger, start - timedelta(hours=1))
    faults = Faults(
        failing_chargers=0.1,
        fail_from=rounds // 6,  # room for K sessions after the failure
        overheating_batteries=0.02,
        silent_devices=0.01,
        bad_messages=0.001,
        duplicates=0.002,
        late=0.002,
        late_rounds=2,
    )
    truth = Truth()
    roles = {"ingest": ("--role", "ingest"), "sessions": ("--role", "sessions")}
    members = {
        name: ConsumerProcess(settings, work / f"{name}.log", *args) for name, args in roles.items()
    }
    publishing = asyncio.create_task(
        publish(
            bootstrap,
            fleet,
            start,
            INTERVAL,
            rounds,
            "mixed",
            settings.meter_topic,
            settings.vehicle_topic,
            settings.mixed_topic,
            False,
            faults=faults,
            truth=truth,
            rate=20_000,
        )
    )
    conn = await asyncpg.connect(dsn)
    try:
        # kill -9 each once, mid-run (a third and two thirds stored), and start it again
        for (name, args), share in zip(roles.items(), (1 / 3, 2 / 3), strict=True):
            await _stored(conn, partial(_at_least, share, truth))
            members[name].kill()
            members[name] = ConsumerProcess(settings, work / f"{name}-2.log", *args)
        await publishing
        await _stored(conn, lambda n: n == truth.readings)
        await _settled(conn)
        proof = await _check(conn, settings, truth, fleet)
    finally:
        await conn.close()
        for member in members.values():
            await member.stop()
    (work / "truth.json").write_text(truth.to_json())
    return proof


def _at_least(share: float, truth: Truth, stored: int) -> bool:
    """Stored that share of the run's readings (published so far, while it publishes)."""
    return stored >= share * truth.readings > 0


async def _stored(
    conn: asyncpg.Connection, enough: Callable[[int], bool], timeout: float = 600
) -> None:
    """Wait until the history rows stored are enough."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not enough(
        await conn.fetchval(
            "SELECT (SELECT count(*) FROM meter_history) + (SELECT count(*) FROM vehicle_history)"
        )
    ):
        if loop.time() > deadline:
            raise TimeoutError("the readings were not stored in time")
        await asyncio.sleep(0.2)


async def _settled(conn: asyncpg.Connection, timeout: float = 600) -> None:
    """Every stored reading sessionized, every transition published, for 3 s running."""
    loop = asyncio.get_running_loop()
    deadline, quiet_since = loop.time() + timeout, None
    while loop.time() < deadline:
        pending = await conn.fetchval(
            "SELECT (SELECT count(*) FROM batch_marks)"
            " + (SELECT count(*) FROM alert_transitions WHERE published_at IS NULL)"
        )
        if pending == 0:
            quiet_since = quiet_since or loop.time()
            if loop.time() - quiet_since > 3:
                return
        else:
            quiet_since = None
        await asyncio.sleep(0.5)
    raise TimeoutError("the platform did not settle")


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def _check(conn: asyncpg.Connection, settings: Settings, truth: Truth, fleet: Fleet) -> Proof:
    proof = Proof()
    newest = await conn.fetchval('SELECT max("timestamp") FROM vehicle_live')
    gap = timedelta(minutes=settings.session_gap_minutes + settings.session_lateness_minutes)
    rows = await conn.fetch(
        "SELECT vehicle_id, meter_id, started_at, ended_at, efficiency_ratio FROM charging_sessions"
    )
    platform = defaultdict(list)
    for r in rows:
        platform[r["vehicle_id"]].append(r)

    # Sessions: the truth's, finished before the watermark could close them.
    failed_at = {m: _at(t) for m, t in truth.failing_chargers.items()}
    quiet_from = {d: _at(t) for d, t in truth.silent.items()}
    never = newest + timedelta(days=1)

    def heard(s: dict[str, Any]) -> bool:
        """Neither its vehicle nor its meter went quiet before the session ended."""
        end = _at(str(s["endedAt"]))
        return all(end <= quiet_from.get(str(s[d]), never) for d in ("vehicleId", "meterId"))

    finished = [s for s in truth.sessions if _at(str(s["endedAt"])) < newest - gap and heard(s)]
    matched = efficient = rated = 0
    for s in finished:
        start, end = _at(str(s["startedAt"])), _at(str(s["endedAt"]))
        match = next(
            (
                p
                for p in platform[str(s["vehicleId"])]
                if abs(p["started_at"] - start) <= INTERVAL and abs(p["ended_at"] - end) <= INTERVAL
            ),
            None,
        )
        if match is None:
            continue
        matched += 1
        fail = failed_at.get(str(s["meterId"]))
        if match["efficiency_ratio"] is None or (fail is not None and start < fail <= end):
            continue
        rated += 1
        true = float(s["efficiency"])
        efficient += abs(float(match["efficiency_ratio"]) - true) / true <= 0.005
    share = matched / len(finished) if finished else 0.0
    proof.figures |= {
        "truth_sessions": len(finished),
        "platform_sessions": len(rows),
        "matched_start_end": matched,
        "matched_share": round(share, 4),
        "efficiency_within_0.5pct": f"{efficient}/{rated}",
    }
    proof.check(len(finished) > 0, "no finished session in the truth")
    proof.check(share >= 0.99, f"only {share:.2%} of sessions match start and end")
    proof.check(efficient >= 0.99 * rated, f"efficiency within 0.5%: {efficient}/{rated}")

    # Charger alerts: one per failing charger, in time; none elsewhere.
    alerts = await conn.fetch("SELECT kind, subject, opened_at FROM alerts")
    by_kind: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for a in alerts:
        by_kind[a["kind"]].append(a)
    low = by_kind["charger_efficiency_low"]
    low_meters = [a["subject"] for a in low]
    proof.check(len(low_meters) == len(set(low_meters)), "a charger got two efficiency alerts")
    # A failing charger must be alerted once K of its sessions after the failure are over.
    k = settings.alert_sessions
    # Rated sessions only: one whose meter measured under FLEET_EFFICIENCY_MIN_AC_KWH is
    # insufficient_data, and counts for no charger (true AC = DC / efficiency).
    min_ac = settings.efficiency_min_ac_kwh
    ends_after_failure = {
        m: sorted(
            _at(str(s["endedAt"]))
            for s in finished
            if s["meterId"] == m
            and _at(str(s["startedAt"])) >= at
            and float(s["kwhDeliveredDc"]) / float(s["efficiency"]) >= min_ac
        )
        for m, at in failed_at.items()
    }
    due = {m: ends[k - 1] for m, ends in ends_after_failure.items() if len(ends) >= k}
    opened = {a["subject"]: a["opened_at"] for a in low}
    proof.check(
        set(due) <= set(opened), f"failing chargers not alerted: {sorted(set(due) - set(opened))}"
    )
    proof.check(
        set(opened) <= set(failed_at),
        f"healthy chargers alerted: {sorted(set(opened) - set(failed_at))}",
    )
    late_alerts = [m for m, end in due.items() if m in opened and opened[m] > end + INTERVAL]
    proof.check(not late_alerts, f"efficiency alerts later than K sessions: {late_alerts}")
    healthy = {m for m in fleet.meter_ids if m not in failed_at}
    proof.figures |= {
        "failing_chargers": len(failed_at),
        "failing_with_k_sessions_after": len(due),
        "efficiency_alerts": len(low),
        "false_positives": len(set(low_meters) & healthy),
        "sessions_of_healthy_chargers": sum(1 for r in rows if r["meter_id"] in healthy),
    }

    # Overheat and silence: the injected devices, no others.
    hot = {a["subject"] for a in by_kind["battery_overheat"]}
    heated = {
        v for v, (first, _) in truth.overheated.items() if _at(first) < quiet_from.get(v, never)
    }
    proof.check(hot == heated, f"overheat alerts differ: {sorted(hot ^ heated)[:5]}")
    silence = timedelta(minutes=settings.silent_after_minutes)
    expected_silent = {d for d, last in truth.silent.items() if _at(last) < newest - silence}
    quiet = {a["subject"] for a in by_kind["device_silent"]}
    proof.check(quiet == expected_silent, f"silent alerts {sorted(quiet ^ expected_silent)[:5]}")
    proof.figures |= {
        "overheat_alerts": len(hot),
        "overheated_injected": len(heated),
        "silent_alerts": len(quiet),
        "silent_injected": len(expected_silent),
    }

    # The outbox: every transition in the topic, exactly once by id.
    recorded = {str(r[0]) for r in await conn.fetch("SELECT transition_id FROM alert_transitions")}
    sent = await _topic_ids(settings)
    proof.check(set(sent) == recorded, "the alerts topic and the transitions differ")
    proof.figures |= {
        "transitions": len(recorded),
        "messages_in_topic": sum(sent.values()),
        "distinct_ids_in_topic": len(sent),
    }
    return proof


async def _topic_ids(settings: Settings) -> dict[str, int]:
    consumer = AIOKafkaConsumer(
        settings.alerts_topic,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    counts: dict[str, int] = defaultdict(int)
    try:
        while batch := await consumer.getmany(timeout_ms=3000):
            for records in batch.values():
                for record in records:
                    counts[json.loads(record.value)["transitionId"]] += 1
    finally:
        await consumer.stop()
    return counts


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=400, help="meters, and as many vehicles")
    parser.add_argument("--hours", type=float, default=48.0, help="of readings, one a minute")
    args = parser.parse_args()
    work = ROOT / ".proof"
    admin_dsn = os.environ.get(
        "FLEET_BENCH_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    if not await postgres_reachable(admin_dsn):
        admin_dsn = start_embedded_postgres(work / "pgdata")
    broker = start_broker(work)
    try:
        proof = await prove(
            work,
            broker.bootstrap_servers,
            admin_dsn,
            devices=args.devices,
            hours=args.hours,
            database="fleet_sessions_proof",
        )
    finally:
        broker.stop()
    for name, value in proof.figures.items():
        print(f"{name:32} {value}")
    for failure in proof.failures:
        print(f"FAILED: {failure}")
    print(json.dumps(proof.figures | {"failures": proof.failures}))
    return 1 if proof.failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
