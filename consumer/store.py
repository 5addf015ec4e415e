"""PostgreSQL side of the pipeline: partition claims and the batch transaction.

The batch commit contract, in one place (mirrored by ``# Step N`` comments):

1. Fence: advance the stored offset of every partition in the batch, only where
   this member's fence token is still current and the stored offset is not past
   the batch. Any partition that does not match -> roll back, raise Fenced.
2. History: binary COPY each stream into a session temp table (emptied by the
   commit), then one INSERT ... SELECT ... ON CONFLICT DO NOTHING per history
   table, so a re-sent reading (same device and timestamp) lands once.
3. Live: one bulk upsert per live table of the batch collapsed to the newest
   reading per device; the WHERE guard keeps a newer stored reading.
4. Dead letters: COPY the rejects with their bytes, source and reason.
5. Commit. Offsets, history, live and dead letters land together or not at all.

A data error in step 2-3 (a reading the database refuses despite validation)
rolls back and the batch is written again reading by reading, each under a
savepoint, so only the refused readings become dead letters.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog

from consumer.batch import Batch, DeadLetter, Message, OffsetRange, dead_letter, newest_per_device
from consumer.decode import Reason, Rejection
from consumer.errors import Fenced
from consumer.models import MeterReading, Reading, Stream

log = structlog.get_logger(__name__)

TopicPartition = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Claim:
    """A member's hold on a partition: where to resume and the fence token to commit with."""

    next_offset: int | None
    fence: int


@dataclass(slots=True)
class StreamCounts:
    stored: int = 0
    duplicate: int = 0
    stale: int = 0


@dataclass(slots=True)
class WriteResult:
    counts: dict[Stream, StreamCounts] = field(
        default_factory=lambda: {s: StreamCounts() for s in Stream}
    )
    dead_letters: list[DeadLetter] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Table:
    """How one stream maps onto its history, live and staging tables."""

    history: str
    live: str
    stage: str
    columns: tuple[str, ...]
    types: tuple[str, ...]

    @property
    def key(self) -> str:
        return self.columns[0]


_TABLES = {
    Stream.METER: _Table(
        "meter_history", "meter_live", "meter_stage",
        ("meter_id", "kwh_consumed_ac", "voltage", "timestamp"),
        ("text", "numeric(10,3)", "numeric(8,2)", "timestamptz"),
    ),
    Stream.VEHICLE: _Table(
        "vehicle_history", "vehicle_live", "vehicle_stage",
        ("vehicle_id", "soc", "kwh_delivered_dc", "battery_temp", "timestamp"),
        ("text", "numeric(5,2)", "numeric(10,3)", "numeric(5,2)", "timestamptz"),
    ),
}
_DEAD_LETTER_COLUMNS = (
    "topic", "partition", "offset", "message_key", "payload", "reason", "detail"
)


def _quoted(columns: Sequence[str]) -> str:
    return ", ".join(f'"{c}"' for c in columns)


def _row(reading: Reading) -> tuple[Any, ...]:
    if isinstance(reading, MeterReading):
        return (reading.meterId, reading.kwhConsumedAc, reading.voltage, reading.timestamp)
    return (
        reading.vehicleId, reading.soc, reading.kwhDeliveredDc,
        reading.batteryTemp, reading.timestamp,
    )


def _history_sql(t: _Table) -> str:
    cols = _quoted(t.columns)
    return f"INSERT INTO {t.history} ({cols}) SELECT {cols} FROM {t.stage} ON CONFLICT DO NOTHING"


def _live_sql(t: _Table) -> str:
    cols = _quoted(t.columns)
    arrays = ", ".join(f"${i}::{typ}[]" for i, typ in enumerate(t.types, start=1))
    updates = ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in t.columns[1:])
    return (
        f"INSERT INTO {t.live} ({cols}) SELECT * FROM unnest({arrays}) "
        f'ON CONFLICT ("{t.key}") DO UPDATE SET {updates}, updated_at = now() '
        f'WHERE {t.live}."timestamp" < EXCLUDED."timestamp"'
    )


def _single_history_sql(t: _Table) -> str:
    cols = _quoted(t.columns)
    params = ", ".join(f"${i}" for i in range(1, len(t.columns) + 1))
    return f"INSERT INTO {t.history} ({cols}) VALUES ({params}) ON CONFLICT DO NOTHING"


_FENCE_SQL = """
UPDATE consumer_offsets o
   SET next_offset = b.next, updated_at = now()
  FROM unnest($2::text[], $3::int[], $4::bigint[], $5::bigint[], $6::bigint[])
       AS b(topic, part, first, next, fence)
 WHERE o.group_id = $1 AND o.topic = b.topic AND o."partition" = b.part
   AND o.fence = b.fence AND coalesce(o.next_offset, 0) <= b.first
RETURNING o.topic, o."partition"
"""

_CLAIM_SQL = """
INSERT INTO consumer_offsets AS o (group_id, topic, "partition", fence, owner)
SELECT $1, t, p, 1, $4 FROM unnest($2::text[], $3::int[]) AS c(t, p)
ON CONFLICT (group_id, topic, "partition")
DO UPDATE SET fence = o.fence + 1, owner = EXCLUDED.owner, updated_at = now()
RETURNING topic, "partition", next_offset, fence
"""


async def _prepare_connection(conn: asyncpg.Connection) -> None:
    """Per-connection staging tables for COPY; emptied by every commit."""
    for t in _TABLES.values():
        columns = ", ".join(f'"{c}" {typ}' for c, typ in zip(t.columns, t.types, strict=True))
        await conn.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {t.stage} ({columns}) ON COMMIT DELETE ROWS"
        )


class Store:
    def __init__(self, pool: asyncpg.Pool, group_id: str, owner: str) -> None:
        self.pool = pool
        self.group_id = group_id
        self.owner = owner

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        group_id: str,
        owner: str,
        idle_in_transaction_timeout_ms: int = 30_000,
        max_size: int = 4,
    ) -> Store:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=max_size,
            init=_prepare_connection,
            server_settings={
                "application_name": f"fleet-consumer {owner}"[:63],
                "idle_in_transaction_session_timeout": str(idle_in_transaction_timeout_ms),
            },
        )
        return cls(pool, group_id, owner)

    async def close(self, timeout: float = 10.0) -> None:
        try:
            await asyncio.wait_for(self.pool.close(), timeout)
        except TimeoutError:
            self.pool.terminate()

    async def ping(self) -> None:
        async with self.pool.acquire() as conn:
            await conn.fetchval("SELECT 1")

    async def prepare_partitions(self, months_back: int, months_ahead: int) -> int:
        async with self.pool.acquire() as conn:
            created: int = await conn.fetchval(
                "SELECT fleet_prepare_history_partitions($1, $2)", months_back, months_ahead
            )
            return created

    async def claim(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, Claim]:
        """Take over partitions: bump their fence (waiting out any writer) and read the offsets."""
        ordered = sorted(set(partitions))  # one lock order for every member: no deadlocks
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                _CLAIM_SQL,
                self.group_id,
                [t for t, _ in ordered],
                [p for _, p in ordered],
                self.owner,
            )
        return {(r["topic"], r["partition"]): Claim(r["next_offset"], r["fence"]) for r in rows}

    async def write(self, batch: Batch, claims: dict[TopicPartition, Claim]) -> WriteResult:
        """Write one batch in one transaction (see the module docstring)."""
        async with self.pool.acquire() as conn:
            try:
                async with conn.transaction():
                    return await self._write_in_transaction(conn, batch, claims, row_by_row=False)
            except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
                log.warning("batch_refused_by_database", error=str(exc), records=len(batch))
            async with conn.transaction():
                return await self._write_in_transaction(conn, batch, claims, row_by_row=True)

    async def _write_in_transaction(
        self,
        conn: asyncpg.Connection,
        batch: Batch,
        claims: dict[TopicPartition, Claim],
        *,
        row_by_row: bool,
    ) -> WriteResult:
        result = WriteResult(dead_letters=list(batch.dead_letters))
        # Step 1: fence.
        await self._advance_offsets(conn, batch.offsets, claims)
        for stream, readings in batch.readings.items():
            if not readings:
                continue
            counts = result.counts[stream]
            # Step 2: history.
            if row_by_row:
                readings, counts.stored, refused = await self._history_row_by_row(
                    conn, stream, readings, batch.sources[stream]
                )
                result.dead_letters.extend(refused)
            else:
                counts.stored = await self._copy_history(conn, stream, readings)
            counts.duplicate = len(readings) - counts.stored
            # Step 3: live.
            counts.stale = await self._upsert_live(conn, stream, readings)
        # Step 4: dead letters.
        if result.dead_letters:
            await conn.copy_records_to_table(
                "dead_letters",
                columns=_DEAD_LETTER_COLUMNS,
                records=[
                    (d.topic, d.partition, d.offset, d.key, d.payload,
                     d.rejection.reason.value, d.rejection.detail)
                    for d in result.dead_letters
                ],
            )
        # Step 5: the caller's `async with conn.transaction()` commits on return.
        return result

    async def _advance_offsets(
        self,
        conn: asyncpg.Connection,
        offsets: dict[TopicPartition, OffsetRange],
        claims: dict[TopicPartition, Claim],
    ) -> None:
        ordered = sorted(offsets)
        unclaimed = [tp for tp in ordered if tp not in claims]
        if unclaimed:
            raise Fenced(unclaimed)
        rows = await conn.fetch(
            _FENCE_SQL,
            self.group_id,
            [t for t, _ in ordered],
            [p for _, p in ordered],
            [offsets[tp].first for tp in ordered],
            [offsets[tp].next for tp in ordered],
            [claims[tp].fence for tp in ordered],
        )
        if len(rows) != len(ordered):
            advanced = {(r["topic"], r["partition"]) for r in rows}
            raise Fenced([tp for tp in ordered if tp not in advanced])

    async def _copy_history(
        self, conn: asyncpg.Connection, stream: Stream, readings: Sequence[Reading]
    ) -> int:
        """COPY into the staging table, then move what is new; returns rows stored."""
        t = _TABLES[stream]
        await conn.copy_records_to_table(
            t.stage, columns=t.columns, records=[_row(r) for r in readings]
        )
        status = await conn.execute(_history_sql(t))
        return int(status.rsplit(" ", 1)[1])

    async def _history_row_by_row(
        self,
        conn: asyncpg.Connection,
        stream: Stream,
        readings: Sequence[Reading],
        sources: Sequence[Message],
    ) -> tuple[list[Reading], int, list[DeadLetter]]:
        """Slow path: (readings accepted, rows stored, dead letters for the refused ones)."""
        sql = _single_history_sql(_TABLES[stream])
        accepted: list[Reading] = []
        refused: list[DeadLetter] = []
        stored = 0
        for reading, source in zip(readings, sources, strict=True):
            try:
                async with conn.transaction():  # a savepoint
                    status = await conn.execute(sql, *_row(reading))
            except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
                detail = f"{exc.sqlstate}: {exc}"[:500]
                refused.append(
                    dead_letter(source, Rejection(Reason.DATABASE_REJECTED, detail, stream))
                )
                continue
            accepted.append(reading)
            stored += status.endswith(" 1")
        return accepted, stored, refused

    async def _upsert_live(
        self, conn: asyncpg.Connection, stream: Stream, readings: Sequence[Reading]
    ) -> int:
        """Upsert the newest reading per device; returns how many the guard kept out (stale)."""
        newest = newest_per_device(readings)
        columns = list(zip(*(_row(r) for r in newest), strict=True))
        status = await conn.execute(_live_sql(_TABLES[stream]), *columns)
        return len(newest) - int(status.rsplit(" ", 1)[1])
