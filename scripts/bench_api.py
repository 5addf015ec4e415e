"""Read-side benchmark: the performance query and the fleet report on 10M history rows.

1. Fresh database `fleet_bench_api`: 10,000 vehicles x 500 readings and 10,000 meters
   x 500 readings at 1-minute steps (time-ordered, as ingestion writes them), one meter
   per vehicle, every tenth vehicle moved to another meter half-way; then VACUUM ANALYZE.
2. The API alone in a child process (make_app + analytics routes on a free port).
3. N concurrent clients ask for random vehicles over the 24 h window ending after the
   last reading (every request aggregates 500 vehicle rows and 500 meter rows).
4. One client walks every page of GET /v1/analytics/fleet/efficiency over the same window,
   five times (the hourly totals are built as `migrate` builds them on an existing history);
   before each walk the report's version is bumped, so its first page ranks the window anew.
5. The console's fleet overview opened five times in Debian's chromium (headless, fresh
   profile, ranking cold): from navigation to the first vehicles on screen.
Prints the plan of one request and the latency percentiles; the last line is JSON.
--readings 2500 gives 50M rows.

Client, API and PostgreSQL share this machine's cores: the figures are for all three.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import aiohttp
import asyncpg
from aiohttp import web
from playwright.async_api import async_playwright
from pydantic import SecretStr

from consumer.api import analytics_sql
from consumer.api.analytics import analytics_routes
from consumer.api.app import make_app
from consumer.api.console import console_routes
from consumer.api.deps import API_SERVER_SETTINGS, ApiDeps
from consumer.settings import Settings
from devtools.stack import free_port, fresh_database

DATABASE = "fleet_bench_api"
CHROMIUM = os.environ.get("FLEET_TEST_CHROMIUM", "/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent


async def _load(
    admin_dsn: str, devices: int, readings: int, workers: int
) -> tuple[str, datetime, int, int]:
    dsn = await fresh_database(admin_dsn, DATABASE)
    # The last reading a few minutes ago, so every row is in a prepared monthly partition.
    end = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=5)
    start = end - timedelta(minutes=readings)
    total = devices * readings
    # Row i is device i % devices at minute i / devices: time-ordered, like live ingestion.
    vehicle_sql = (
        'INSERT INTO vehicle_history (vehicle_id, soc, kwh_delivered_dc, battery_temp, "timestamp") '
        "SELECT 'v-' || (i % $2), 50, 0.5 + (i % 7) * 0.01, 20 + (i % 11), "
        "$1::timestamptz + (i / $2) * interval '1 minute' FROM generate_series($3::bigint, $4) i"
    )
    meter_sql = (
        'INSERT INTO meter_history (meter_id, kwh_consumed_ac, voltage, "timestamp") '
        "SELECT 'm-' || (i % $2), 0.58 + (i % 5) * 0.01, 230, "
        "$1::timestamptz + (i / $2) * interval '1 minute' FROM generate_series($3::bigint, $4) i"
    )
    chunk = -(-total // workers)

    async def insert(statement: str, lo: int) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("SET synchronous_commit = off")
            await conn.execute(statement, start, devices, lo, min(lo + chunk, total) - 1)
        finally:
            await conn.close()

    began = time.perf_counter()
    for statement in (vehicle_sql, meter_sql):
        await asyncio.gather(*(insert(statement, lo) for lo in range(0, total, chunk)))
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO vehicle_meter_assignments (vehicle_id, meter_id, valid_from, valid_to) "
            "SELECT 'v-' || i, 'm-' || i, $1::timestamptz - interval '30 days', "
            "CASE WHEN i % 10 = 0 THEN $2::timestamptz END FROM generate_series(0, $3 - 1) i "
            "UNION ALL SELECT 'v-' || i, 'm-' || ((i + 1) % $3), $2::timestamptz, NULL "
            "FROM generate_series(0, $3 - 1, 10) i",
            start,
            start + (end - start) / 2,
            devices,
        )
        print(f"loaded history in {time.perf_counter() - began:.0f} s", flush=True)
        built = time.perf_counter()
        await conn.execute(  # what migrate (sql/014) does on a history it finds
            "SELECT fleet_refresh_hourly("
            " (SELECT array_agg('v-' || i) FROM generate_series(0, $1 - 1) i),"
            " (SELECT array_agg('-infinity'::timestamptz) FROM generate_series(1, $1)),"
            " (SELECT array_agg('m-' || i) FROM generate_series(0, $1 - 1) i),"
            " (SELECT array_agg('-infinity'::timestamptz) FROM generate_series(1, $1)))",
            devices,
        )
        print(f"built the hourly totals in {time.perf_counter() - built:.0f} s", flush=True)
        # As autovacuum would: the visibility map lets the sums be index-only scans.
        await conn.execute("VACUUM (ANALYZE)")
        rows_vehicle = await conn.fetchval("SELECT count(*) FROM vehicle_history")
        rows_meter = await conn.fetchval("SELECT count(*) FROM meter_history")
    finally:
        await conn.close()
    print(
        f"loaded {rows_vehicle:,} vehicle + {rows_meter:,} meter rows "
        f"in {time.perf_counter() - began:.0f} s",
        flush=True,
    )
    return dsn, end, rows_vehicle, rows_meter


async def _walk_fleet(
    base: str, dsn: str, start: datetime, end: datetime, walks: int
) -> tuple[list[float], list[float]]:
    """Every page of the fleet report over [start, end), `walks` times, each walk starting
    cold (the version bumped, as a change of the totals would): (first pages' latencies,
    the other pages' latencies)."""
    first: list[float] = []
    rest: list[float] = []
    conn = await asyncpg.connect(dsn)
    async with aiohttp.ClientSession() as http:
        for _ in range(walks):
            await conn.execute("UPDATE fleet_report_version SET version = version + 1")
            params = {"from": start.isoformat(), "to": end.isoformat()}
            latencies = first
            while True:
                t0 = time.perf_counter()
                async with http.get(f"{base}/v1/analytics/fleet/efficiency", params=params) as resp:
                    body = await resp.json()
                    if resp.status != 200:
                        raise SystemExit(f"fleet report: HTTP {resp.status} {body}")
                latencies.append(time.perf_counter() - t0)
                latencies = rest
                if body["nextCursor"] is None:
                    break
                params = {"cursor": body["nextCursor"]}
    await conn.close()
    return first, rest


async def _console_first_render(base: str, dsn: str, times: int) -> list[float]:
    """The console's fleet overview in Debian's chromium (headless, a fresh profile each
    time), from navigation to its first page of vehicles on screen, the ranking cold."""
    conn = await asyncpg.connect(dsn)
    renders: list[float] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        for _ in range(times):
            await conn.execute("UPDATE fleet_report_version SET version = version + 1")
            context = await browser.new_context()
            page = await context.new_page()
            t0 = time.perf_counter()
            await page.goto(f"{base}/console/")
            await page.wait_for_selector("[data-vehicle]")
            renders.append(time.perf_counter() - t0)
            await context.close()
        await browser.close()
    await conn.close()
    return renders


async def _print_plan(dsn: str, vehicle: str, start: datetime, end: datetime) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        thresholds = (Decimal("0.5"), Decimal("0.85"), Decimal("1.0"))
        plan = await conn.fetch(
            f"EXPLAIN (ANALYZE, BUFFERS) {analytics_sql.PERFORMANCE}",
            *thresholds,
            vehicle,
            start,
            end,
            None,
        )
    finally:
        await conn.close()
    print("\n".join(r[0] for r in plan), flush=True)


async def _serve(dsn: str, port: int, pool_size: int) -> None:
    """The API alone, until killed."""
    pool = await asyncpg.create_pool(
        dsn, min_size=pool_size, max_size=pool_size, server_settings=API_SERVER_SETTINGS
    )
    settings = Settings(database_url=SecretStr(dsn))
    settings = settings.model_copy(update={"api_auth": "off"})
    routes = [*analytics_routes(), *console_routes()]
    app = make_app({}, deps=ApiDeps(settings, pool=pool), routes=routes)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("serving", flush=True)
    await asyncio.Event().wait()


async def _measure(
    base: str, *, devices: int, start: datetime, end: datetime, requests: int, concurrency: int
) -> list[float]:
    params = {"from": start.isoformat(), "to": end.isoformat()}
    rng = random.Random(42)  # noqa: S311 -- picking vehicles, not secrets
    latencies: list[float] = []
    remaining = iter(range(requests))
    failures: list[int] = []

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:

        async def worker() -> None:
            for _ in remaining:
                url = f"{base}/v1/analytics/performance/v-{rng.randrange(devices)}"
                t0 = time.perf_counter()
                async with http.get(url, params=params) as resp:
                    await resp.read()
                    if resp.status != 200:
                        failures.append(resp.status)
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, e.g. HTTP {failures[0]}")
    return latencies


def _percentile(sorted_ms: list[float], p: float) -> float:
    return round(sorted_ms[min(len(sorted_ms) - 1, int(len(sorted_ms) * p / 100))], 2)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--admin-dsn",
        default=os.environ.get(
            "FLEET_BENCH_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--readings", type=int, default=500, help="per device, a minute apart")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--workers", type=int, default=4, help="parallel loading connections")
    parser.add_argument("--serve", metavar="DSN", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        await _serve(args.serve, args.port, args.concurrency)
        return

    dsn, end, rows_vehicle, rows_meter = await _load(
        args.admin_dsn, args.devices, args.readings, args.workers
    )
    start = end + timedelta(minutes=10) - timedelta(hours=24)
    window_end = end + timedelta(minutes=10)
    await _print_plan(dsn, "v-10", start, window_end)

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",  # as this script runs: scripts/ and devtools/ are not installed packages
            "scripts.bench_api",
            "--serve",
            dsn,
            "--port",
            str(port),
            "--concurrency",
            str(args.concurrency),
        ],
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert server.stdout is not None  # noqa: S101 -- piped just above
        await asyncio.to_thread(server.stdout.readline)  # "serving"
        base = f"http://127.0.0.1:{port}"
        window = {"devices": args.devices, "start": start, "end": window_end}
        await _measure(base, **window, requests=500, concurrency=args.concurrency)  # warm-up
        began = time.perf_counter()
        latencies = await _measure(
            base, **window, requests=args.requests, concurrency=args.concurrency
        )
        elapsed = time.perf_counter() - began
        await _walk_fleet(base, dsn, start, window_end, walks=1)  # warm-up
        first, rest = await _walk_fleet(base, dsn, start, window_end, walks=5)
        renders = sorted(x * 1000 for x in await _console_first_render(base, dsn, times=5))
    finally:
        server.terminate()
        server.wait(timeout=10)

    ms = sorted(x * 1000 for x in latencies)
    first_pages = sorted(x * 1000 for x in first)
    pages = sorted(x * 1000 for x in first + rest)
    print(
        f"{len(ms)} requests, {args.concurrency} concurrent, {len(ms) / elapsed:.0f} req/s, "
        f"mean {statistics.fmean(ms):.2f} ms",
        flush=True,
    )
    print(
        f"fleet report: {len(pages)} pages of 100 vehicles in {len(first)} walks, one client, "
        f"p50 {_percentile(pages, 50)} ms, p99 {_percentile(pages, 99)} ms, max {pages[-1]:.1f} ms; "
        f"first page of a walk (ranks the window) p50 {_percentile(first_pages, 50)} ms",
        flush=True,
    )
    print(
        f"console: fleet overview on screen in chromium, ranking cold, "
        f"p50 {_percentile(renders, 50)} ms, max {renders[-1]:.0f} ms",
        flush=True,
    )
    print(
        json.dumps(
            {
                "requests": len(ms),
                "concurrency": args.concurrency,
                "p50_ms": _percentile(ms, 50),
                "p95_ms": _percentile(ms, 95),
                "p99_ms": _percentile(ms, 99),
                "rows_vehicle": rows_vehicle,
                "rows_meter": rows_meter,
                "requests_per_second": round(len(ms) / elapsed, 1),
                "fleet_page_p50_ms": _percentile(pages, 50),
                "fleet_page_p99_ms": _percentile(pages, 99),
                "fleet_first_page_p50_ms": _percentile(first_pages, 50),
                "console_first_render_p50_ms": _percentile(renders, 50),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
