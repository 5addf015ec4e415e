"""What PostgreSQL must hold after the chaos, checked in SQL, and the report."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer.settings import Settings
from scripts.chaos import PARTITIONS

if TYPE_CHECKING:
    from scripts.chaos.runs import Group, Run


@dataclass
class Tally:
    """What was injected, what was found wrong, and the figures worth reporting."""

    faults: Counter[str] = field(default_factory=Counter)
    anomalies: dict[str, int] = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)


async def log_end_offsets(settings: Settings) -> dict[tuple[str, int], int]:
    """The offset after each partition's last record.

    ListOffsets answers it on Kafka; tansu answers the last batch's base offset instead,
    so the records from there on are read to find the true end (on Kafka: none).
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in settings.topics for p in range(PARTITIONS)]
        ends = await consumer.end_offsets(tps)
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, ends[tp])
        while fetched := await consumer.getmany(timeout_ms=1000):
            for tp, records in fetched.items():
                ends[tp] = max(ends[tp], records[-1].offset + 1)
        return {(tp.topic, tp.partition): offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


async def stored_offsets(dsn: str, group_id: str) -> dict[tuple[str, int], int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            'SELECT topic, "partition", next_offset FROM consumer_offsets WHERE group_id = $1',
            group_id,
        )
    finally:
        await conn.close()
    return {(r["topic"], r["partition"]): r["next_offset"] or 0 for r in rows}


async def caught_up(settings: Settings, dsn: str, timeout: float) -> float | None:
    """Seconds until every partition's stored offset reached its log end; None if never.
    Called once everything is published: the log ends stand still meanwhile."""
    began = time.monotonic()
    ends = await log_end_offsets(settings)
    while time.monotonic() - began < timeout:
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            stored = await stored_offsets(dsn, settings.group_id)
            if all(stored.get(tp, 0) == end for tp, end in ends.items()):
                return time.monotonic() - began
        await asyncio.sleep(1)
    return None


async def settled(dsn: str, group: Group, quiet: float = 8, timeout: float = 300) -> bool:
    """Wait until every partition is claimed by a running member and none was claimed for
    `quiet` seconds: the group is stable. False if that did not happen within timeout.
    (tansu can take minutes to let new members in after others left.)"""
    members = {f"-{m.process.pid}" for m in group.members.values()}
    began = last_change = time.monotonic()
    seen = await claims(dsn)
    while time.monotonic() - began < timeout:
        await asyncio.sleep(1)
        now = await claims(dsn)
        if now != seen:
            seen, last_change = now, time.monotonic()
        owned = all(owner.endswith(tuple(members)) for _, owner in now.values())
        if owned and time.monotonic() - last_change >= quiet:
            return True
    return False


async def claims(dsn: str) -> dict[tuple[str, int], tuple[int, str]]:
    """(fence, owner) of every partition."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch('SELECT topic, "partition", fence, owner FROM consumer_offsets')
    finally:
        await conn.close()
    return {(r["topic"], r["partition"]): (r["fence"], r["owner"]) for r in rows}


_HISTORY = {  # kind -> (history, live, id column, value columns)
    "meter": ("meter_history", "meter_live", "meter_id", ("kwh_consumed_ac", "voltage")),
    "vehicle": (
        "vehicle_history",
        "vehicle_live",
        "vehicle_id",
        ("soc", "kwh_delivered_dc", "battery_temp"),
    ),
}


def _row(alias: str, columns: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"{alias}.{c}" for c in columns) + ")"


async def check_database(dsn: str, runs: list[Run], tally: Tally) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TEMP TABLE expected (kind text, device text, ts timestamptz)")
        chunk: list[tuple[str, str, datetime]] = []
        for run in runs:
            for row in run.expected():
                chunk.append(row)
                if len(chunk) == 100_000:
                    await conn.copy_records_to_table("expected", records=chunk)
                    chunk.clear()
        await conn.copy_records_to_table("expected", records=chunk)
        await conn.execute("CREATE INDEX ON expected (kind, device, ts)")
        await conn.execute("ANALYZE expected")
        anomalies = Counter[str]()
        for kind, (history, live, id_col, values) in _HISTORY.items():
            keys = f'SELECT {id_col}, "timestamp" FROM {history}'
            wanted = f"SELECT device, ts FROM expected WHERE kind = '{kind}'"
            anomalies["valid readings missing from history"] += await conn.fetchval(
                f"SELECT count(*) FROM ({wanted} EXCEPT {keys}) missing"
            )
            anomalies["history rows that are no valid reading"] += await conn.fetchval(
                f"SELECT count(*) FROM ({keys} EXCEPT {wanted}) unexpected"
            )
            anomalies["duplicate history rows"] += await conn.fetchval(
                f'SELECT count(*) - count(DISTINCT ({id_col}, "timestamp")) FROM {history}'
            )
            anomalies["live rows not the newest reading"] += await conn.fetchval(
                f"""SELECT count(*) FROM (SELECT device, max(ts) AS ts FROM expected
                                          WHERE kind = '{kind}' GROUP BY device) newest
                    FULL JOIN {live} l ON l.{id_col} = newest.device
                    WHERE l."timestamp" IS DISTINCT FROM newest.ts"""
            )
            anomalies["live values differing from their history row"] += await conn.fetchval(
                f"""SELECT count(*) FROM {live} l LEFT JOIN {history} h
                      ON h.{id_col} = l.{id_col} AND h."timestamp" = l."timestamp"
                    WHERE h.{id_col} IS NULL
                       OR {_row("h", values)} IS DISTINCT FROM {_row("l", values)}"""
            )
        got = dict(await conn.fetch("SELECT reason, count(*) FROM dead_letters GROUP BY 1"))
        injected = Counter[str]()
        for run in runs:
            injected.update(run.truth.bad_messages)
        anomalies["dead letters differing from injected bad messages (by reason)"] = sum(
            abs(got.get(reason, 0) - injected.get(reason, 0)) for reason in {*got, *injected}
        )
        tally.anomalies.update(anomalies)
        history = await conn.fetchval(
            "SELECT (SELECT count(*) FROM meter_history) + (SELECT count(*) FROM vehicle_history)"
        )
        tally.figures["history rows checked"] = f"{history:,}"
        tally.figures["dead letters checked"] = f"{sum(got.values()):,}"
    finally:
        await conn.close()


async def check_offsets(settings: Settings, dsn: str, tally: Tally) -> None:
    ends = await log_end_offsets(settings)
    stored = await stored_offsets(dsn, settings.group_id)
    tally.anomalies["partitions whose stored offset is not the log end"] = sum(
        stored.get(tp, 0) != end for tp, end in ends.items()
    )
    tally.figures["partitions checked"] = str(len(ends))


def report(tally: Tally, seconds: float) -> str:
    width = max(len(k) for k in [*tally.faults, *tally.anomalies, *tally.figures]) + 2
    lines = [
        "",
        "| fault injected".ljust(width + 2) + "| count |",
        "|" + "-" * (width + 1) + "|------:|",
    ]
    lines += [f"| {k}".ljust(width + 2) + f"| {v:>5} |" for k, v in tally.faults.items()]
    lines += ["", "| anomaly".ljust(width + 2) + "| found |", "|" + "-" * (width + 1) + "|------:|"]
    lines += [f"| {k}".ljust(width + 2) + f"| {v:>5} |" for k, v in tally.anomalies.items()]
    lines += ["", "| figure".ljust(width + 2) + "| value", "|" + "-" * (width + 1) + "|------"]
    lines += [f"| {k}".ljust(width + 2) + f"| {v}" for k, v in tally.figures.items()]
    lines += [
        "",
        f"total: {seconds / 60:.1f} min on {os.cpu_count()} cores shared by broker, "
        "PostgreSQL, consumers and harness",
    ]
    return "\n".join(lines)
