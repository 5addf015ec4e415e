"""End-to-end ingest benchmark: simulator -> local broker -> consumer -> PostgreSQL.

1. Publish a fleet's backfill (default 10,000 meters + 10,000 vehicles x 25 rounds
   = 500,000 readings) to the mixed topic of a local broker.
2. Run `python -m consumer run` on a fresh database and time it from its first
   fetched batch to its last committed one (from its own batch log lines), with
   exactly-once offsets and duplicate suppression on, as in production.
   Its sessions worker rests while it is behind; once the consumer has exited, the
   worker's cycles run back to back until no mark is left: the cost it deferred.
3. On another fresh database, COPY the same rows from a file with psql: the
   database's own ceiling on this machine.
Prints both rates, their ratio and the consumer's peak RSS; the last line is JSON.

Broker, database and consumer share this machine's cores: the figures are for
all three together, not for the consumer alone.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import shutil
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from pydantic import SecretStr

from consumer.kafka import ensure_topics
from consumer.sessions import SessionWorker
from consumer.settings import Settings
from devtools.processes import ConsumerProcess
from devtools.stack import (
    admin_database,
    configured_or_local_broker,
    free_port,
    fresh_database,
)
from producer_sim.__main__ import publish
from producer_sim.fleet import Fleet

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".bench"


async def _fresh_database(admin_dsn: str, name: str) -> str:
    dsn = await fresh_database(admin_dsn, name)
    admin = await asyncpg.connect(admin_dsn)
    try:  # start from a quiet server: no checkpoint of earlier work in the timed window
        await admin.execute("CHECKPOINT")
    except asyncpg.InsufficientPrivilegeError:
        pass
    finally:
        await admin.close()
    return dsn


def _ingest_window(log_path: Path) -> tuple[int, float]:
    """(records, seconds) from the first batch's start to the last batch's commit."""
    batches = []
    for line in log_path.read_text().splitlines():
        if '"batch_committed"' in line:
            batches.append(json.loads(line))
    if not batches:
        raise SystemExit(f"the consumer committed nothing; see {log_path}")

    def at(entry: dict[str, Any]) -> float:
        return datetime.fromisoformat(entry["timestamp"]).timestamp()

    first = batches[0]
    start = at(first) - first["write_seconds"] - first["decode_seconds"]
    return sum(b["records"] for b in batches), at(batches[-1]) - start


def _write_copy_files(
    fleet: Fleet, start: datetime, interval: timedelta, rounds: int
) -> tuple[Path, Path]:
    meters, vehicles = WORK / "meters.csv", WORK / "vehicles.csv"
    with meters.open("w", newline="") as mf, vehicles.open("w", newline="") as vf:
        mw, vw = csv.writer(mf), csv.writer(vf)
        for r in fleet.readings(start, interval, rounds):
            if "meterId" in r:
                mw.writerow((r["meterId"], r["kwhConsumedAc"], r["voltage"], r["timestamp"]))
            else:
                vw.writerow(
                    (
                        r["vehicleId"],
                        r["soc"],
                        r["kwhDeliveredDc"],
                        r["batteryTemp"],
                        r["timestamp"],
                    )
                )
    return meters, vehicles


def _psql_copy_seconds(dsn: str, meters: Path, vehicles: Path) -> float:
    psql = shutil.which("psql")
    if psql is None:
        raise SystemExit("psql is needed for the COPY ceiling")
    script = (
        f"\\copy meter_history (meter_id, kwh_consumed_ac, voltage, \"timestamp\") FROM '{meters}' CSV\n"
        f'\\copy vehicle_history (vehicle_id, soc, kwh_delivered_dc, battery_temp, "timestamp") '
        f"FROM '{vehicles}' CSV\n"
    )
    began = time.perf_counter()
    subprocess.run([psql, dsn, "-v", "ON_ERROR_STOP=1", "-q"], input=script.encode(), check=True)
    return time.perf_counter() - began


async def _sessionize_backlog(dsn: str, group_id: str) -> float:
    """Seconds for the sessions worker's cycles, back to back, to take every mark left."""
    settings = Settings(database_url=SecretStr(dsn), group_id=group_id)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        worker = SessionWorker(pool, settings)
        began = time.perf_counter()
        while (await worker.cycle()).waiting:
            pass
        return time.perf_counter() - began
    finally:
        await pool.close()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--meters", type=int, default=10_000)
    parser.add_argument("--vehicles", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--batch-max-records", type=int, default=10_000)
    parser.add_argument("--write-lanes", type=int, default=2)
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)

    admin_dsn = await admin_database(WORK)
    with configured_or_local_broker(WORK) as bootstrap:
        suffix = datetime.now(UTC).strftime("%H%M%S")
        topics = {
            "meter": f"bench-meter-{suffix}",
            "vehicle": f"bench-vehicle-{suffix}",
            "mixed": f"bench-fleet-{suffix}",
        }
        await ensure_topics(bootstrap, topics.values(), args.partitions)
        fleet = Fleet(args.meters, args.vehicles, seed=1)
        interval = timedelta(minutes=1)
        start = datetime.now(UTC).replace(microsecond=0) - args.rounds * interval
        began = time.perf_counter()
        readings = await publish(
            bootstrap,
            fleet,
            start,
            interval,
            args.rounds,
            "mixed",
            topics["meter"],
            topics["vehicle"],
            topics["mixed"],
            False,
        )
        publish_s = time.perf_counter() - began
        print(
            f"published {readings:,} readings in {publish_s:.1f} s ({readings / publish_s:,.0f}/s)"
        )

        dsn = await _fresh_database(admin_dsn, "fleet_bench")
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")} | {
            "FLEET_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "FLEET_DATABASE_URL": dsn,
            "FLEET_METER_TOPIC": topics["meter"],
            "FLEET_VEHICLE_TOPIC": topics["vehicle"],
            "FLEET_MIXED_TOPIC": topics["mixed"],
            "FLEET_DLQ_TOPIC": f"bench-dlq-{suffix}",
            "FLEET_GROUP_ID": f"bench-{suffix}",
            "FLEET_BATCH_MAX_RECORDS": str(args.batch_max_records),
            "FLEET_WRITE_LANES": str(args.write_lanes),
            "FLEET_KAFKA_IDEMPOTENT_PRODUCER": "false",
            "FLEET_SESSION_TIMEOUT_MS": "6000",
            "FLEET_HTTP_PORT": str(free_port()),
            "FLEET_LOG_JSON": "true",
        }
        log_path = WORK / "consumer.log"
        log_path.unlink(missing_ok=True)
        consumer = ConsumerProcess(env, log_path, "--idle-timeout", "5")
        code = await consumer.wait(timeout=None)
        peak_rss_mb = consumer.peak_rss_kib / 1024
        if code != 0:
            raise SystemExit(f"consumer exited with {code}; see {log_path}")
        records, ingest_s = _ingest_window(log_path)
        conn = await asyncpg.connect(dsn)
        stored = await conn.fetchval(
            "SELECT (SELECT count(*) FROM meter_history) + (SELECT count(*) FROM vehicle_history)"
        )
        # The sessions worker ran beside the write path (`run` = every role), resting while
        # behind: how far it got by the consumer's exit, then what the rest of it costs.
        behind = await conn.fetchval(
            "SELECT count(DISTINCT d) FROM batch_marks, unnest(vehicle_ids || meter_ids) d"
        )
        catch_up_s = await _sessionize_backlog(dsn, env["FLEET_GROUP_ID"])
        sessions = await conn.fetchval("SELECT count(*) FROM charging_sessions")
        await conn.close()
        if stored != readings:
            raise SystemExit(f"stored {stored} of {readings} readings; see {log_path}")

        meters_csv, vehicles_csv = _write_copy_files(fleet, start, interval, args.rounds)
        ceiling_dsn = await _fresh_database(admin_dsn, "fleet_bench_copy")
        copy_s = _psql_copy_seconds(ceiling_dsn, meters_csv, vehicles_csv)

        ingest_rate = records / ingest_s
        copy_rate = readings / copy_s
        print(
            f"consumer: {records:,} records in {ingest_s:.2f} s = {ingest_rate:,.0f} readings/s "
            f"(batches of {args.batch_max_records}, {args.write_lanes} write lanes, "
            f"{args.partitions} partitions)"
        )
        print(f"psql COPY ceiling: {readings:,} rows in {copy_s:.2f} s = {copy_rate:,.0f} rows/s")
        print(
            f"ratio consumer/COPY: {ingest_rate / copy_rate:.2f}; consumer peak RSS {peak_rss_mb:.0f} MB"
        )
        print(
            f"sessions: {behind:,} devices not yet sessionized at the consumer's exit; "
            f"the worker alone then took {catch_up_s:.1f} s to catch up ({sessions:,} sessions)"
        )
        print(f"machine: {os.cpu_count()} cores shared by broker, PostgreSQL and consumer")
        print(
            json.dumps(
                {
                    "readings": readings,
                    "ingest_readings_per_s": round(ingest_rate),
                    "copy_ceiling_rows_per_s": round(copy_rate),
                    "ratio": round(ingest_rate / copy_rate, 3),
                    "consumer_peak_rss_mb": round(peak_rss_mb, 1),
                    "ingest_seconds": round(ingest_s, 2),
                    "sessions": sessions,
                    "devices_not_sessionized_at_exit": behind,
                    "sessions_catch_up_seconds": round(catch_up_s, 1),
                    "cores": os.cpu_count(),
                }
            )
        )


if __name__ == "__main__":
    asyncio.run(main())
