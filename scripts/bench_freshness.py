"""Freshness benchmark: send -> visible in vehicle_live, under a steady background load.

For each background rate (default 5,000 and 30,000 readings/s):
1. A fresh database and topics; `python -m consumer run --role ingest` with its defaults.
2. The simulator publishes the background load at that rate (its own process, its own
   fleet of devices, to the mixed topic).
3. A probe vehicle sends a reading every 100 ms (timestamp = the moment it is sent,
   linger 0); a poller reads the probe's live row every 5 ms. A probe's latency is the
   time from its send to the first poll that shows it (or a newer one) in vehicle_live.
Prints p50/p95/p99/max per rate and the background rate reached; the last line is JSON.
(The background is a backfill, a minute between rounds: its event times lie in the past, so
the consumer's own fleet_ingest_freshness_seconds says nothing here; the probe does.)

Broker, database, consumer, simulator and probe share this machine's cores (2 here):
the figures are for all of them together.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer

from consumer.kafka import ensure_topics
from devtools.processes import ConsumerProcess
from devtools.stack import (
    admin_database,
    configured_or_local_broker,
    free_port,
    fresh_database,
    wait_for_port,
)

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".bench"
PROBE = "probe-ev"
PROBE_INTERVAL_S = 0.1
POLL_INTERVAL_S = 0.005


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def probe(bootstrap: str, topic: str, dsn: str, seconds: float) -> list[float]:
    """Send the probe every 100 ms for `seconds`; the latencies seen, in seconds."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks="all")
    await producer.start()
    conn = await asyncpg.connect(dsn)
    sent: dict[datetime, float] = {}  # probe timestamp -> when it was sent
    latencies: list[float] = []
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set() or sent:
            seen = await conn.fetchval(
                'SELECT "timestamp" FROM vehicle_live WHERE vehicle_id = $1', PROBE
            )
            now = time.perf_counter()
            if seen is not None:
                for ts in [ts for ts in sent if ts <= seen]:
                    latencies.append(now - sent.pop(ts))
            await asyncio.sleep(POLL_INTERVAL_S)

    watcher = asyncio.create_task(watch())
    try:
        deadline = time.perf_counter() + seconds
        soc = 0.0
        while time.perf_counter() < deadline:
            ts = datetime.now(UTC)
            value = {
                "vehicleId": PROBE,
                "soc": soc,
                "kwhDeliveredDc": 0.01,
                "batteryTemp": 25.0,
                "timestamp": ts.isoformat(),
            }
            soc = (soc + 0.5) % 100
            sent[ts] = time.perf_counter()
            await producer.send(topic, json.dumps(value).encode(), key=PROBE.encode())
            await asyncio.sleep(PROBE_INTERVAL_S)
        done.set()
        await asyncio.wait_for(watcher, timeout=30)
    finally:
        watcher.cancel()
        await producer.stop()
        await conn.close()
    return latencies


# What a benchmark measures once the consumer and the background load run:
# (bootstrap, vehicle topic, dsn, consumer environment, seconds) -> latencies in seconds.
Measure = Callable[[str, str, str, dict[str, str], float], Awaitable[list[float]]]


async def _visible_in_live(
    bootstrap: str, topic: str, dsn: str, env: dict[str, str], seconds: float
) -> list[float]:
    return await probe(bootstrap, topic, dsn, seconds)


async def run_level(
    bootstrap: str,
    admin_dsn: str,
    rate: int,
    seconds: float,
    partitions: int,
    *,
    measure: Measure = _visible_in_live,
) -> dict[str, Any]:
    suffix = f"{rate}-{datetime.now(UTC):%H%M%S}"
    topics = {k: f"fresh-{k}-{suffix}" for k in ("meter", "vehicle", "mixed")}
    await ensure_topics(bootstrap, topics.values(), partitions)
    dsn = await fresh_database(admin_dsn, "fleet_bench_freshness")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")} | {
        "FLEET_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "FLEET_DATABASE_URL": dsn,
        "FLEET_METER_TOPIC": topics["meter"],
        "FLEET_VEHICLE_TOPIC": topics["vehicle"],
        "FLEET_MIXED_TOPIC": topics["mixed"],
        "FLEET_DLQ_TOPIC": f"fresh-dlq-{suffix}",
        "FLEET_GROUP_ID": f"fresh-{suffix}",
        "FLEET_KAFKA_IDEMPOTENT_PRODUCER": "false",
        "FLEET_SESSION_TIMEOUT_MS": "6000",
        "FLEET_HTTP_PORT": str(port),
        "FLEET_LOG_JSON": "true",
    }
    log_path = WORK / f"freshness-consumer-{rate}.log"
    log_path.unlink(missing_ok=True)
    consumer = ConsumerProcess(env, log_path, "--role", "ingest", http_port=port)
    # The background fleet: rounds a minute apart, ending now, paced at `rate`.
    devices = 2_000
    rounds = int(rate * (seconds + 30) / (2 * devices)) + 1
    start = datetime.now(UTC) - timedelta(minutes=rounds)
    simulator = subprocess.Popen(
        ["true"]
        if not rate
        else [
            sys.executable,
            "-m",
            "producer_sim",
            "--meters",
            str(devices),
            "--vehicles",
            str(devices),
            "--rounds",
            str(rounds),
            "--interval-seconds",
            "60",
            "--start",
            start.isoformat(),
            "--rate",
            str(rate),
            "--bootstrap-servers",
            bootstrap,
        ],
        env=env | {"FLEET_MIXED_TOPIC": topics["mixed"]},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, timeout=30)
        await asyncio.sleep(10)  # group join, then a steady state
        latencies = await measure(bootstrap, topics["vehicle"], dsn, env, seconds)
    finally:
        simulator.send_signal(signal.SIGINT)  # stops cleanly and prints its summary
        sim_out, _ = simulator.communicate(timeout=30)
        await consumer.stop(timeout=60)
    lines = sim_out.decode().strip().splitlines()
    summary = json.loads(lines[-1]) if lines else {}
    return {
        "background_per_s": rate,
        "background_reached_per_s": summary.get("readings_per_s"),
        "probes": len(latencies),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p95_ms": round(1000 * percentile(latencies, 0.95), 1),
        "p99_ms": round(1000 * percentile(latencies, 0.99), 1),
        "max_ms": round(1000 * max(latencies), 1),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rates", default="5000,30000", help="background readings/s, comma-separated"
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="probing time per rate")
    parser.add_argument("--partitions", type=int, default=8)
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    admin_dsn = await admin_database(WORK)
    results = []
    with configured_or_local_broker(WORK) as bootstrap:
        for rate in (int(r) for r in args.rates.split(",")):
            result = await run_level(bootstrap, admin_dsn, rate, args.seconds, args.partitions)
            results.append(result)
            print(
                f"background {rate:>6,}/s (reached {result['background_reached_per_s'] or '?'}/s): "
                f"send -> visible in vehicle_live p50 {result['p50_ms']} ms, "
                f"p95 {result['p95_ms']} ms, p99 {result['p99_ms']} ms, "
                f"max {result['max_ms']} ms over {result['probes']} probes"
            )
    print(f"machine: {os.cpu_count()} cores shared by broker, PostgreSQL, consumer, simulator")
    print(json.dumps({"freshness": results, "cores": os.cpu_count()}))


if __name__ == "__main__":
    asyncio.run(main())
