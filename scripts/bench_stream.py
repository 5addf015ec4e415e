"""Live-stream benchmark: send -> received on GET /v1/stream, with many subscribers.

bench_freshness's set-up (a fresh database, `run --role ingest`, the simulator's background
load at 5,000 readings/s), plus `run --role api` in its own process. N subscribers (default
1,000) open GET /v1/stream?vehicleId=probe-ev&kinds=live on that one API process; a probe
vehicle sends a reading every 100 ms (timestamp = when sent). A probe's latency is from its
send to its arrival on the first subscriber; every subscriber must receive every event sent
(a probe superseded by the next before the feed read it is coalesced: live events are state).
Prints p50/p95/p99/max, the API process's CPU (% of one core) and resident memory while it
serves, and whether every subscriber got every probe; the last line is JSON.

Broker, database, consumer, API, simulator and clients share this machine's cores (2 here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiokafka import AIOKafkaProducer

from devtools.processes import ConsumerProcess
from devtools.stack import admin_database, configured_or_local_broker, wait_for_port
from scripts.bench_freshness import PROBE, PROBE_INTERVAL_S, WORK, run_level

TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def _rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):  # noqa: SIM115
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Subscribers:
    """N streams on one API; when each probe timestamp reached each of them."""

    def __init__(self, base: str, count: int) -> None:
        self.base, self.count = base, count
        self.received: list[dict[datetime, float]] = [{} for _ in range(count)]
        self.opened = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, http: aiohttp.ClientSession) -> None:
        self._tasks = [asyncio.create_task(self._read(http, i)) for i in range(self.count)]
        while self.opened < self.count:  # noqa: ASYNC110 -- counted by the reader tasks
            await asyncio.sleep(0.1)

    async def _read(self, http: aiohttp.ClientSession, i: int) -> None:
        url = f"{self.base}/v1/stream?vehicleId={PROBE}&kinds=live"
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=None)) as resp:
            resp.raise_for_status()
            self.opened += 1
            async for raw in resp.content:
                line = raw.decode()
                if line.startswith("data: "):
                    at = datetime.fromisoformat(json.loads(line[6:])["timestamp"])
                    self.received[i].setdefault(at, time.perf_counter())

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def stream_latencies(
    subscribers: int, usage: dict[str, Any]
) -> Any:  # a bench_freshness Measure
    async def measure(
        bootstrap: str, topic: str, dsn: str, env: dict[str, str], seconds: float
    ) -> list[float]:
        api_env = env | {
            "FLEET_API_DATABASE_URL": dsn,
            "FLEET_API_AUTH": "off",
            "FLEET_STREAM_MAX_PER_CLIENT": str(subscribers),  # all from this one client
            "FLEET_HTTP_MAX_CONNECTIONS_PER_ADDRESS": str(subscribers + 10),
            "FLEET_RATE_LIMIT_BURST": str(subscribers + 10),
        }
        api = ConsumerProcess(api_env, WORK / "stream-api.log", "--role", "api")
        base = f"http://127.0.0.1:{api.http_port}"
        connector = aiohttp.TCPConnector(limit=0)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks="all")
        try:
            wait_for_port(api.http_port, timeout=30)
            async with aiohttp.ClientSession(connector=connector) as http:
                streams = Subscribers(base, subscribers)
                await streams.start(http)
                await producer.start()
                sent: dict[datetime, float] = {}
                cpu0, t0, rss = _cpu_seconds(api.process.pid), time.perf_counter(), 0.0
                deadline = t0 + seconds
                while time.perf_counter() < deadline:
                    ts = datetime.now(UTC)
                    value = {
                        "vehicleId": PROBE,
                        "soc": 50.0,
                        "kwhDeliveredDc": 0.01,
                        "batteryTemp": 25.0,
                        "timestamp": ts.isoformat(),
                    }
                    sent[ts] = time.perf_counter()
                    await producer.send(topic, json.dumps(value).encode(), key=PROBE.encode())
                    rss = max(rss, _rss_mib(api.process.pid))
                    await asyncio.sleep(PROBE_INTERVAL_S)
                await asyncio.sleep(3)  # the last probes' way through
                elapsed = time.perf_counter() - t0
                usage["api_cpu_percent_of_a_core"] = round(
                    100 * (_cpu_seconds(api.process.pid) - cpu0) / elapsed, 1
                )
                usage["api_rss_mib"] = round(rss, 1)
                await streams.stop()
        finally:
            await producer.stop()
            await api.stop(timeout=30)
        # Live events are state: a probe superseded by the next one before the feed read
        # it is not sent (coalesced). Every subscriber must have every event that was sent.
        got = [set(r) for r in streams.received]
        streamed = set().union(*got) & set(sent)
        usage["subscribers"] = subscribers
        usage["probes_sent"] = len(sent)
        usage["probes_streamed"] = len(streamed)
        usage["every_subscriber_got_every_event"] = all(streamed <= g for g in got)
        first = {ts: min(r[ts] for r in streams.received if ts in r) for ts in streamed}
        return [first[ts] - sent[ts] for ts in streamed]

    return measure


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=int, default=5000, help="background readings/s")
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--partitions", type=int, default=8)
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    admin_dsn = await admin_database(WORK)
    usage: dict[str, Any] = {}
    with configured_or_local_broker(WORK) as bootstrap:
        measure = await stream_latencies(args.subscribers, usage)
        result = await run_level(
            bootstrap, admin_dsn, args.rate, args.seconds, args.partitions, measure=measure
        )
    result |= usage
    print(
        f"background {args.rate:,}/s: send -> received on /v1/stream p50 {result['p50_ms']} ms, "
        f"p95 {result['p95_ms']} ms, p99 {result['p99_ms']} ms, max {result['max_ms']} ms; "
        f"{args.subscribers} subscribers on one API process: "
        f"{result['api_cpu_percent_of_a_core']}% of a core, {result['api_rss_mib']} MiB; "
        f"every subscriber got every event: {result['every_subscriber_got_every_event']} "
        f"({result['probes_streamed']} of {result['probes_sent']} probes streamed, the rest coalesced)"
    )
    print(f"machine: {os.cpu_count()} cores shared by broker, PostgreSQL, consumer, API, clients")
    print(json.dumps({"stream": result, "cores": os.cpu_count()}))


if __name__ == "__main__":
    asyncio.run(main())
