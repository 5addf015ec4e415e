"""Sessions benchmark: how soon a closed charging session is visible through the API.

1. A fresh database and topics; `python -m consumer run` (every role: ingest, API and the
   sessions worker) with a 15 s session gap and no lateness allowance, so a run is short.
2. The simulator publishes a live background load (--realtime: one round a second, event
   time = wall time), 5,000 readings/s by default.
3. Probe vehicles charge one at a time, 2 s apart: each sends a delivering reading every
   second for 5 s (timestamp = when sent), then stops. Its session is due to close when the
   gap has elapsed after its last reading; a poller asks GET /v1/vehicles/{id}/sessions every
   50 ms. A probe's delay is from the moment the gap elapsed to the first answer that shows
   the session closed.
Prints p50/p95/max of that delay; the last line is JSON. Broker, database, consumer, simulator
and probes share this machine's cores (2 here): the figures are for all of them together.
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
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
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
from scripts.bench_freshness import WORK, percentile

GAP = timedelta(seconds=15)
READINGS = 5  # per probe session, a second apart
POLL_S = 0.05


async def charge_once(producer: AIOKafkaProducer, topic: str, base: str, vehicle: str) -> float:
    """One probe session; seconds from its gap elapsing to the API showing it closed."""
    last = datetime.now(UTC)
    for i in range(READINGS):
        last = datetime.now(UTC)
        reading = {
            "vehicleId": vehicle,
            "soc": 40.0 + i,
            "kwhDeliveredDc": 0.5,
            "batteryTemp": 30.0,
            "timestamp": last.isoformat(),
        }
        await producer.send_and_wait(topic, json.dumps(reading).encode(), key=vehicle.encode())
        await asyncio.sleep(1)
    due = last + GAP
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"{base}/v1/vehicles/{vehicle}/sessions") as resp:
                body = await resp.json()
            sessions = body.get("sessions", [])
            if sessions and sessions[0]["state"] == "closed":
                return (datetime.now(UTC) - due).total_seconds()
            if datetime.now(UTC) > due + timedelta(seconds=120):
                raise SystemExit(f"{vehicle}: not closed 120 s after its gap elapsed: {body}")
            await asyncio.sleep(POLL_S)


async def run(bootstrap: str, admin_dsn: str, rate: int, probes: int) -> dict[str, Any]:
    suffix = f"{datetime.now(UTC):%H%M%S}"
    topics = {k: f"sessions-{k}-{suffix}" for k in ("meter", "vehicle", "mixed")}
    await ensure_topics(bootstrap, topics.values(), 8)
    dsn = await fresh_database(admin_dsn, "fleet_bench_sessions")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")} | {
        "FLEET_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "FLEET_DATABASE_URL": dsn,
        "FLEET_METER_TOPIC": topics["meter"],
        "FLEET_VEHICLE_TOPIC": topics["vehicle"],
        "FLEET_MIXED_TOPIC": topics["mixed"],
        "FLEET_DLQ_TOPIC": f"sessions-dlq-{suffix}",
        "FLEET_ALERTS_TOPIC": f"sessions-alerts-{suffix}",
        "FLEET_GROUP_ID": f"sessions-{suffix}",
        "FLEET_KAFKA_IDEMPOTENT_PRODUCER": "false",
        "FLEET_SESSION_TIMEOUT_MS": "6000",
        "FLEET_SESSION_GAP_MINUTES": str(GAP.total_seconds() / 60),
        "FLEET_SESSION_LATENESS_MINUTES": "0",
        "FLEET_API_AUTH": "off",
        "FLEET_HTTP_HOST": "127.0.0.1",
        "FLEET_HTTP_PORT": str(port),
        "FLEET_LOG_JSON": "true",
    }
    log_path = WORK / "sessions-consumer.log"
    log_path.unlink(missing_ok=True)
    consumer = ConsumerProcess(env, log_path, http_port=port)
    devices = max(1, rate // 2)  # a meter and a vehicle each: one round a second is `rate`
    simulator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "producer_sim",
            "--meters",
            str(devices),
            "--vehicles",
            str(devices),
            "--rounds",
            "100000",
            "--interval-seconds",
            "1",
            "--realtime",
            "--bootstrap-servers",
            bootstrap,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks="all")
    try:
        wait_for_port(port, timeout=30)
        await asyncio.sleep(10)  # group join, then a steady state
        await producer.start()
        base = f"http://127.0.0.1:{port}"

        async def staggered(i: int) -> float:
            await asyncio.sleep(2 * i)
            # The background's topic: every partition busy, as in a live fleet (an idle
            # partition holds the watermark back for a minute; see consumer.sessions).
            return await charge_once(producer, topics["mixed"], base, f"probe-{i}")

        delays = await asyncio.gather(*(staggered(i) for i in range(probes)))
    finally:
        await producer.stop()
        simulator.send_signal(signal.SIGINT)
        sim_out, _ = simulator.communicate(timeout=30)
        await consumer.stop(timeout=60)
    lines = sim_out.decode().strip().splitlines()
    summary = json.loads(lines[-1]) if lines else {}
    return {
        "background_per_s": rate,
        "background_reached_per_s": summary.get("readings_per_s"),
        "probes": len(delays),
        "p50_s": round(statistics.median(delays), 2),
        "p95_s": round(percentile(delays, 0.95), 2),
        "max_s": round(max(delays), 2),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=int, default=5000, help="background readings/s")
    parser.add_argument("--probes", type=int, default=20)
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    with configured_or_local_broker(WORK) as bootstrap:
        result = await run(bootstrap, await admin_database(WORK), args.rate, args.probes)
    print(
        f"background {args.rate:,}/s (reached {result['background_reached_per_s'] or '?'}/s): "
        f"gap elapsed -> closed session visible through the API: p50 {result['p50_s']} s, "
        f"p95 {result['p95_s']} s, max {result['max_s']} s over {result['probes']} sessions"
    )
    print(f"machine: {os.cpu_count()} cores shared by broker, PostgreSQL, consumer, simulator")
    print(json.dumps({"session_close": result, "cores": os.cpu_count()}))


if __name__ == "__main__":
    asyncio.run(main())
