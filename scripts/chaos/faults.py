"""The faults the soak injects: kill -9, PostgreSQL crashes and restarts, terminated backends."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import TYPE_CHECKING

import asyncpg

from devtools.stack import LocalPostgres
from scripts.chaos import log
from scripts.chaos.checks import Tally

if TYPE_CHECKING:
    from scripts.chaos.runs import Group


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
