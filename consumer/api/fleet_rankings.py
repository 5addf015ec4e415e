"""The fleet report's rankings, kept between pages.

Ranking the whole fleet over a window costs about 100 ms at 10,000 vehicles; cutting a page
out of a ranking costs next to nothing. A dashboard reads a window page after page, so each
API process keeps the rankings of its most recent windows and serves pages from them while
what they were computed from is unchanged: `fleet_report_version` (sql/015), bumped in the
transaction of every change to the hourly totals or the meter assignments. The version is
read before the ranking, so a ranking is never labelled newer than its data.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

import asyncpg

VERSION = "SELECT version FROM fleet_report_version"

Window = tuple[datetime, datetime]


@dataclass(frozen=True)
class Ranking:
    """One window's vehicles worst first, as the report's SQL ordered them, and each
    status's share of them (the `status` filter)."""

    version: int
    rows: Sequence[asyncpg.Record]
    by_status: dict[str, list[asyncpg.Record]] = field(init=False)
    _positions: dict[str | None, dict[str, int]] = field(init=False)

    def __post_init__(self) -> None:
        by_status: dict[str, list[asyncpg.Record]] = {}
        for row in self.rows:
            by_status.setdefault(row["status"], []).append(row)
        positions: dict[str | None, dict[str, int]] = {None: _positions(self.rows)}
        positions.update((status, _positions(rows)) for status, rows in by_status.items())
        object.__setattr__(self, "by_status", by_status)
        object.__setattr__(self, "_positions", positions)

    def page(
        self, status: str | None, after: tuple[Decimal | None, str] | None, size: int
    ) -> Sequence[asyncpg.Record] | None:
        """`size` rows after the row `after` names; None when that row is not in this
        ranking as named (the cursor came from data that has changed since)."""
        rows = self.rows if status is None else self.by_status.get(status, [])
        start = 0
        if after is not None:
            ratio, vehicle_id = after
            at = self._positions.get(status, {}).get(vehicle_id)
            if at is None or rows[at]["ratio"] != ratio:
                return None
            start = at + 1
        return rows[start : start + size]


def _positions(rows: Sequence[asyncpg.Record]) -> dict[str, int]:
    return {row["vehicle_id"]: i for i, row in enumerate(rows)}


class FleetRankings:
    """The rankings of the `capacity` most recently used windows of one API process.

    A window asked for by several requests at once is ranked once; the others wait for it.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._rankings: OrderedDict[Window, Ranking] = OrderedDict()
        self._pending: dict[tuple[Window, int], asyncio.Future[Ranking]] = {}

    async def get(
        self,
        conn: asyncpg.Connection | asyncpg.Pool,
        window: Window,
        rank: Callable[[], Awaitable[Sequence[asyncpg.Record]]],
    ) -> Ranking:
        version: int = await conn.fetchval(VERSION)
        kept = self._rankings.get(window)
        if kept is not None and kept.version == version:
            self._rankings.move_to_end(window)
            return kept
        key = (window, version)
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Ranking] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            ranking = Ranking(version, await rank())
            future.set_result(ranking)
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved: a failure nobody else waited for is not logged
            raise
        finally:
            del self._pending[key]
        if self._capacity > 0:
            self._rankings[window] = ranking
            self._rankings.move_to_end(window)
            while len(self._rankings) > self._capacity:
                self._rankings.popitem(last=False)
        return ranking
