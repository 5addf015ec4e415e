"""`make demo`: the whole pipeline on this machine, with a small simulated fleet.

Uses FLEET_KAFKA_BOOTSTRAP_SERVERS / FLEET_DATABASE_URL when set; otherwise
starts a local Kafka-protocol broker (tansu) and a local PostgreSQL (pgserver)
under .demo/. Then: migrate, run the consumer, publish two hours of readings of
200 meters and 200 vehicles (plus a few malformed messages; ten chargers fail from
the start), show what landed and the alert raised for a failing charger, and keep
running until Ctrl-C so you can look around.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaProducer

from consumer.kafka import ensure_topics
from consumer.migrate import migrate
from consumer.settings import Settings
from devtools.processes import ConsumerProcess
from devtools.stack import Broker, free_port, start_broker, wait_for_port, with_database
from producer_sim.__main__ import publish
from producer_sim.assignments import write_assignments
from producer_sim.faults import Faults, Truth
from producer_sim.fleet import Fleet

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / ".demo"
METERS = VEHICLES = 200
ROUNDS = 120  # two hours at one reading per minute
MALFORMED = [b"{not json", b'{"meterId": "meter-00001", "kwhConsumedAc": -1}', b"\xff\xfe"]


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


async def _wait_for_rows(dsn: str, since: datetime, expected: int, timeout: float = 120) -> int:
    """Rows this run stored (a database kept from an earlier run holds more)."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout
        while True:
            stored = await conn.fetchval(
                "SELECT (SELECT count(*) FROM meter_history WHERE ingested_at >= $1)"
                " + (SELECT count(*) FROM vehicle_history WHERE ingested_at >= $1)"
                " + (SELECT count(*) FROM dead_letters WHERE received_at >= $1)",
                since,
            )
            if stored >= expected or time.monotonic() > deadline:
                return int(stored)
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


async def _show_alerts(dsn: str, timeout: float = 60) -> None:
    """Wait for the sessions worker to catch up, then show the failing chargers' alerts."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not await conn.fetchval("SELECT count(*) FROM batch_marks"):
                break
            await asyncio.sleep(0.5)
        sessions = await conn.fetchval("SELECT count(*) FROM charging_sessions")
        print(f"charging sessions: {sessions:,}")
        for alert in await conn.fetch(
            "SELECT kind, subject, opened_at, evidence->>'averageEfficiency' AS efficiency"
            " FROM alerts WHERE kind = 'charger_efficiency_low' ORDER BY subject"
        ):
            print(
                f"alert: {alert['kind']} on {alert['subject']} (efficiency "
                f"{float(alert['efficiency']):.2f}) at {alert['opened_at']:%H:%M}"
            )
    finally:
        await conn.close()


async def _report(dsn: str, efficiency: dict[str, float]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        counts = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM meter_history) AS meter_rows,"
            " (SELECT count(*) FROM vehicle_history) AS vehicle_rows,"
            " (SELECT count(*) FROM meter_live) AS meters_live,"
            " (SELECT count(*) FROM vehicle_live) AS vehicles_live"
        )
        print(
            f"history: {counts['meter_rows']:,} meter and {counts['vehicle_rows']:,} vehicle "
            f"readings; live: {counts['meters_live']} meters, {counts['vehicles_live']} vehicles"
        )
        for row in await conn.fetch(
            "SELECT reason, count(*) FROM dead_letters GROUP BY reason ORDER BY reason"
        ):
            print(f"dead letter: {row['reason']} x{row['count']}")
        live = await conn.fetchrow("SELECT * FROM vehicle_live ORDER BY vehicle_id LIMIT 1")
        print(
            f"live {live['vehicle_id']}: soc {live['soc']}% battery {live['battery_temp']} C "
            f"at {live['timestamp']:%H:%M:%S} (stored {live['updated_at']:%H:%M:%S})"
        )
        rows = await conn.fetch(
            """
            SELECT a.vehicle_id, a.meter_id,
                   round(v.dc / nullif(m.ac, 0), 4) AS ratio, v.dc, m.ac
              FROM vehicle_meter_assignments a
              CROSS JOIN LATERAL (SELECT sum(kwh_delivered_dc) AS dc FROM vehicle_history
                                   WHERE vehicle_id = a.vehicle_id
                                     AND "timestamp" > now() - interval '24 hours') v
              CROSS JOIN LATERAL (SELECT sum(kwh_consumed_ac) AS ac FROM meter_history
                                   WHERE meter_id = a.meter_id
                                     AND "timestamp" > now() - interval '24 hours') m
             WHERE v.dc > 1
             ORDER BY ratio LIMIT 5
            """
        )
        print("charging efficiency, last 24 h, worst first (DC delivered / AC consumed):")
        for r in rows:
            print(
                f"  {r['vehicle_id']} at {r['meter_id']}: {r['ratio']} "
                f"({r['dc']} kWh DC / {r['ac']} kWh AC; simulated charger "
                f"{efficiency[r['meter_id']]:.3f})"
            )
    finally:
        await conn.close()


async def main(seconds: float | None) -> int:
    STATE.mkdir(exist_ok=True)
    broker: Broker | None = None
    embedded_pg = None
    consumer: ConsumerProcess | None = None
    bootstrap = os.environ.get("FLEET_KAFKA_BOOTSTRAP_SERVERS")
    dsn = os.environ.get("FLEET_DATABASE_URL")
    try:
        if not bootstrap:
            say("starting a local Kafka-protocol broker (tansu, in memory)")
            broker = start_broker(STATE)
            bootstrap = broker.bootstrap_servers
        if not dsn:
            say("starting a local PostgreSQL (pgserver) in .demo/pgdata")
            warnings.filterwarnings("ignore", module="platformdirs")  # XDG_RUNTIME_DIR unset
            import pgserver  # noqa: PLC0415 -- dev extra

            embedded_pg = pgserver.get_server(str(STATE / "pgdata"), cleanup_mode="stop")
            dsn = with_database(embedded_pg.get_uri(), "fleet")
        os.environ |= {"FLEET_KAFKA_BOOTSTRAP_SERVERS": bootstrap, "FLEET_DATABASE_URL": dsn}
        if broker is not None:
            os.environ["FLEET_KAFKA_IDEMPOTENT_PRODUCER"] = "false"  # tansu lacks InitProducerId
        os.environ.setdefault("FLEET_HTTP_PORT", str(8080 if _port_free(8080) else free_port()))
        # A demo on this machine only: no tokens, so bound to the loopback interface.
        os.environ.setdefault("FLEET_HTTP_HOST", "127.0.0.1")
        os.environ.setdefault("FLEET_API_AUTH", "off")
        # Two hours hold one or two sessions a vehicle: rate a charger on its last one.
        os.environ.setdefault("FLEET_ALERT_SESSIONS", "1")
        settings = Settings()

        say("migrating the database")
        print("applied:", await migrate(dsn) or "nothing new")
        if broker is not None:
            await _forget_offsets(dsn, settings.group_id)
        topics = [*settings.topics, settings.dlq_topic, settings.alerts_topic]
        await ensure_topics(bootstrap, topics, partitions=4)

        say("starting the consumer (python -m consumer run); its log is .demo/consumer.log")
        (STATE / "consumer.log").unlink(missing_ok=True)
        consumer = ConsumerProcess(
            dict(os.environ), STATE / "consumer.log", http_port=settings.http_port
        )
        wait_for_port(settings.http_port, timeout=30)

        fleet = Fleet(METERS, VEHICLES, seed=1)
        interval = timedelta(minutes=1)
        began = datetime.now(UTC)
        start = began.replace(microsecond=0) - ROUNDS * interval
        # Which charger each vehicle uses, before its readings arrive: sessions get their meter.
        await write_assignments(dsn, fleet.charger, start - timedelta(days=30))
        truth = Truth()
        say(f"publishing {ROUNDS} minutes of readings from {METERS} meters and {VEHICLES} vehicles")
        published = await publish(
            bootstrap,
            fleet,
            start,
            interval,
            ROUNDS,
            "mixed",
            settings.meter_topic,
            settings.vehicle_topic,
            settings.mixed_topic,
            settings.kafka_idempotent_producer,
            faults=Faults(failing_chargers=0.05, fail_from=0),
            truth=truth,
        )
        await _publish_malformed(bootstrap, settings.mixed_topic)
        print(f"published {published:,} readings and {len(MALFORMED)} malformed messages")

        say("waiting for the consumer to store them")
        stored = await _wait_for_rows(dsn, began, published + len(MALFORMED))
        print(f"stored {stored:,} of {published + len(MALFORMED):,} messages")
        failing = dict.fromkeys(truth.failing_chargers, truth.failing_efficiency)
        await _report(dsn, fleet.efficiency | failing)
        await _show_alerts(dsn)

        port = settings.http_port
        say("where to look")
        print(f"  analytics: curl -s localhost:{port}/v1/analytics/performance/ev-00141")
        print(f"  fleet:     curl -s 'localhost:{port}/v1/analytics/fleet/efficiency?limit=5'")
        print(f"  live:      curl -s localhost:{port}/v1/vehicles/ev-00001/live")
        print(f"  sessions:  curl -s localhost:{port}/v1/vehicles/ev-00001/sessions")
        print(f"  chargers:  curl -s 'localhost:{port}/v1/chargers/health?limit=5'")
        print(f"  alerts:    curl -s 'localhost:{port}/v1/alerts?state=open'")
        print(f"  API doc:   curl -s localhost:{port}/openapi.json")
        print(f"  metrics:   curl -s localhost:{port}/metrics | grep ^fleet_")
        print(f"  readiness: curl -s localhost:{port}/readyz")
        print(f"  database:  psql '{dsn}' -c 'SELECT * FROM vehicle_live LIMIT 5'")
        print(f"  consumer:  tail -f {STATE / 'consumer.log'}")
        if seconds is None:
            print("\nRunning; press Ctrl-C to stop.")
        await _wait_for_interrupt(seconds)
        return 0
    finally:
        if consumer is not None:
            await consumer.stop(timeout=30)
        if broker is not None:
            broker.stop()
        if embedded_pg is not None:
            embedded_pg.cleanup()


async def _forget_offsets(dsn: str, group_id: str) -> None:
    """The demo's broker starts empty every time: offsets stored by an earlier run point
    into a log that no longer exists (see docs/operations.md, "The broker lost its log")."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DELETE FROM consumer_offsets WHERE group_id = $1", group_id)
    finally:
        await conn.close()


async def _publish_malformed(bootstrap: str, topic: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for value in MALFORMED:
            await producer.send_and_wait(topic, value, key=b"demo")
    finally:
        await producer.stop()


async def _wait_for_interrupt(seconds: float | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, help="stop after this long (default: Ctrl-C)")
    sys.exit(asyncio.run(main(parser.parse_args().seconds)))
