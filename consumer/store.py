"""PostgreSQL side of the pipeline: partition claims and the batch transaction.

The batch commit contract, in one place:

1. Fence: every partition of the batch must still carry this member's fence
   token and a stored offset not past the batch; otherwise nothing is written
   and the batch is dropped (Fenced) so its partitions are re-claimed.
2. History: the readings are appended; a re-sent reading (same device and
   timestamp) conflicts with the stored one and is skipped.
3. Live: the batch is collapsed to the newest reading per device and upserted;
   the guard keeps a newer stored reading.
4. Dead letters: rejects are appended with their bytes, source and reason.
5. Commit: offsets, history, live and dead letters land together or not at all.

Steps 1-4 run inside sql/006_write_batch.sql's fleet_write_batch(), called as
one statement (hence one transaction) with binary-encoded arrays: one round trip
per batch, so the event loop is free to poll and decode the next batch while
PostgreSQL writes this one.

A data error (a reading the database refuses despite validation) rolls back,
and the batch is written again reading by reading, each under a savepoint, so
only the refused readings become dead letters.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import structlog
from aiokafka import TopicPartition

from consumer.batch import Batch, DeadLetter, OffsetRange, dead_letter
from consumer.decode import Reason, Rejection
from consumer.errors import REFUSED_DATA, Fenced
from consumer.models import MeterReading, Reading, Stream, VehicleReading

log = structlog.get_logger(__name__)


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
    # A retry found the batch committed by an attempt whose answer was lost (the
    # connection broke after the commit): nothing written now, counts unknown.
    committed_earlier: bool = False


# Every partition of the batch still under our fence, its stored offset at the batch's end.
_COMMITTED_SQL = """
SELECT count(*) = cardinality($2::text[]) FROM consumer_offsets o
  JOIN unnest($2::text[], $3::int[], $4::bigint[], $5::bigint[]) AS b(topic, part, next, fence)
    ON o.group_id = $1 AND o.topic = b.topic AND o."partition" = b.part
   AND o.next_offset = b.next AND o.fence = b.fence
"""

_WRITE_SQL = "SELECT * FROM fleet_write_batch(" + ", ".join(f"${i}" for i in range(1, 24)) + ")"
_NO_OFFSETS: tuple[list[Any], ...] = ([], [], [], [], [], [])


def _meter_columns(meters: Sequence[MeterReading]) -> tuple[list[Any], ...]:
    return (
        [r.meterId for r in meters],
        [r.kwhConsumedAc for r in meters],
        [r.voltage for r in meters],
        [r.timestamp for r in meters],
    )


def _vehicle_columns(vehicles: Sequence[VehicleReading]) -> tuple[list[Any], ...]:
    return (
        [r.vehicleId for r in vehicles],
        [r.soc for r in vehicles],
        [r.kwhDeliveredDc for r in vehicles],
        [r.batteryTemp for r in vehicles],
        [r.timestamp for r in vehicles],
    )


def _letter_columns(letters: Sequence[DeadLetter]) -> tuple[list[Any], ...]:
    return (
        [d.topic for d in letters],
        [d.partition for d in letters],
        [d.offset for d in letters],
        [d.key for d in letters],
        [d.payload for d in letters],
        [d.rejection.reason.value for d in letters],
        [d.rejection.detail for d in letters],
    )


_CLAIM_SQL = """
INSERT INTO consumer_offsets AS o (group_id, topic, "partition", fence, owner)
SELECT $1, t, p, 1, $4 FROM unnest($2::text[], $3::int[]) AS c(t, p)
ON CONFLICT (group_id, topic, "partition")
DO UPDATE SET fence = o.fence + 1, owner = EXCLUDED.owner, updated_at = now()
RETURNING topic, "partition", next_offset, fence
"""


class Store:
    """The consumer group's side of PostgreSQL, for one member (`owner`).

    Owns its connection pool (the write lanes', never shared with the API). Promises:
    claim() bumps the fences of the partitions it takes, waiting out any batch still
    writing them, and returns where each resumes; write() is the batch transaction of
    the module docstring, all or nothing, refused whole (Fenced) when a partition's fence
    has moved on; reset_offset() moves a claimed partition's stored offset, only under
    its fence. Every call is bounded in time (FLEET_DB_COMMAND_TIMEOUT_SECONDS) and raises
    the driver's errors, for consumer.sink to tell the transient ones. Called by the
    pipeline and by history maintenance.
    """

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
        command_timeout: float | None = None,
        max_size: int = 4,
    ) -> Store:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=max_size,
            # A connection that died without a word (no RST) must fail the call, not stall
            # it: the connect and every statement are bounded, and the retry path takes over.
            timeout=command_timeout or 60.0,
            command_timeout=command_timeout,
            server_settings={
                "application_name": f"fleet-consumer {owner}"[:63],
                "idle_in_transaction_session_timeout": str(idle_in_transaction_timeout_ms),
            },
        )
        return cls(pool, group_id, owner)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection. One whose session the server ended in the middle of an
        operation (a restart, pg_terminate_backend) can leave the client's protocol state
        behind (InternalClientError, MagicStack/asyncpg#1069), and one whose statement
        timed out may be dead or still busy: either is closed, not pooled."""
        async with self.pool.acquire() as conn:
            try:
                yield conn
            except (asyncpg.InternalClientError, TimeoutError):
                conn.terminate()
                raise

    async def close(self, timeout: float = 10.0) -> None:
        try:
            await asyncio.wait_for(self.pool.close(), timeout)
        except TimeoutError:
            self.pool.terminate()

    async def ping(self) -> None:
        async with self._connection() as conn:
            await conn.fetchval("SELECT 1")

    async def prepare_partitions(self, months_back: int, months_ahead: int) -> int:
        async with self._connection() as conn:
            created: int = await conn.fetchval(
                "SELECT fleet_prepare_history_partitions($1, $2)", months_back, months_ahead
            )
            return created

    async def prune_stream(self, keep: timedelta) -> int:
        """Drop the live stream's change-log rows older than `keep` (sql/016); how many."""
        async with self._connection() as conn:
            pruned: int = await conn.fetchval("SELECT fleet_prune_stream($1)", keep)
            return pruned

    async def drop_history_before(self, cutoff: datetime) -> list[str]:
        """Drop the monthly history partitions entirely older than cutoff; their names."""
        async with self._connection() as conn:
            dropped: list[str] = await conn.fetchval(
                "SELECT fleet_drop_history_partitions($1)", cutoff
            )
            return dropped

    async def default_partition_rows(self) -> tuple[int, int]:
        """(meter, vehicle) readings outside every prepared month."""
        async with self._connection() as conn:
            row = await conn.fetchrow("SELECT * FROM fleet_history_default_rows()")
        return int(row["meter_rows"]), int(row["vehicle_rows"])

    async def claim(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, Claim]:
        """Take over partitions: bump their fence (waiting out any writer) and read the offsets."""
        ordered = sorted(set(partitions))  # one lock order for every member: no deadlocks
        async with self._connection() as conn:
            rows = await conn.fetch(
                _CLAIM_SQL,
                self.group_id,
                [t for t, _ in ordered],
                [p for _, p in ordered],
                self.owner,
            )
        return {
            TopicPartition(r["topic"], r["partition"]): Claim(r["next_offset"], r["fence"])
            for r in rows
        }

    async def reset_offset(self, tp: TopicPartition, claim: Claim, next_offset: int) -> bool:
        """Move a claimed partition's stored offset (the log it pointed into is gone);
        False when another member has claimed it since."""
        async with self._connection() as conn:
            status: str = await conn.execute(
                "UPDATE consumer_offsets SET next_offset = $4, updated_at = now() "
                'WHERE group_id = $1 AND topic = $2 AND "partition" = $3 AND fence = $5',
                self.group_id,
                tp[0],
                tp[1],
                next_offset,
                claim.fence,
            )
        return status == "UPDATE 1"

    async def write(self, batch: Batch, claims: dict[TopicPartition, Claim]) -> WriteResult:
        """Write one batch in one transaction (see the module docstring)."""
        offsets = self._offset_columns(batch.offsets, claims)
        async with self._connection() as conn:
            try:
                # One statement is one transaction: no BEGIN/COMMIT round trips.
                row = await self._call(
                    conn,
                    offsets,
                    meters=batch.readings[Stream.METER],
                    vehicles=batch.readings[Stream.VEHICLE],
                    letters=batch.dead_letters,
                )
                if row["fenced"] and await self._committed_earlier(conn, offsets):
                    return WriteResult(
                        dead_letters=list(batch.dead_letters), committed_earlier=True
                    )
                _raise_if_fenced(row)  # a fenced call wrote nothing
            except REFUSED_DATA as exc:
                log.warning("batch_refused_by_database", error=str(exc), records=len(batch))
            else:
                result = WriteResult(dead_letters=list(batch.dead_letters))
                for stream, prefix in ((Stream.METER, "meters"), (Stream.VEHICLE, "vehicles")):
                    _count(
                        result.counts[stream],
                        batch.readings[stream],
                        row[f"{prefix}_stored"],
                        row[f"{prefix}_live"],
                    )
                return result
            async with conn.transaction():
                return await self._write_row_by_row(conn, batch, offsets)

    async def _committed_earlier(
        self, conn: asyncpg.Connection, offsets: tuple[list[Any], ...]
    ) -> bool:
        topics, partitions, _first, nexts, fences, _newest = offsets
        committed: bool = await conn.fetchval(
            _COMMITTED_SQL, self.group_id, topics, partitions, nexts, fences
        )
        return committed

    async def _write_row_by_row(
        self, conn: asyncpg.Connection, batch: Batch, offsets: tuple[list[Any], ...]
    ) -> WriteResult:
        """Slow path: each reading under a savepoint; the refused ones become dead letters."""
        _raise_if_fenced(await self._call(conn, offsets))
        result = WriteResult(dead_letters=list(batch.dead_letters))
        for stream, readings in batch.readings.items():
            counts = result.counts[stream]
            for reading, source in zip(readings, batch.sources[stream], strict=True):
                try:
                    async with conn.transaction():  # a savepoint
                        if isinstance(reading, MeterReading):
                            row = await self._call(conn, meters=[reading])
                        else:
                            row = await self._call(conn, vehicles=[reading])
                except REFUSED_DATA as exc:
                    code = getattr(exc, "sqlstate", None) or "driver"
                    detail = f"{code}: {exc}"[:500]
                    rejection = Rejection(Reason.DATABASE_REJECTED, detail, stream)
                    result.dead_letters.append(dead_letter(source, rejection))
                    continue
                stored = row["meters_stored"] + row["vehicles_stored"]
                counts.stored += stored
                counts.duplicate += 1 - stored
                counts.stale += 1 - (row["meters_live"] + row["vehicles_live"])
        await self._call(conn, letters=result.dead_letters)
        return result

    async def _call(
        self,
        conn: asyncpg.Connection,
        offsets: tuple[list[Any], ...] = _NO_OFFSETS,
        *,
        meters: Sequence[Reading] = (),
        vehicles: Sequence[Reading] = (),
        letters: Sequence[DeadLetter] = (),
    ) -> asyncpg.Record:
        """fleet_write_batch() with whatever part of a batch is given."""
        row: asyncpg.Record = await conn.fetchrow(
            _WRITE_SQL,
            self.group_id,
            *offsets,
            *_meter_columns(meters),  # type: ignore[arg-type]  # Batch keeps them by stream
            *_vehicle_columns(vehicles),  # type: ignore[arg-type]
            *_letter_columns(letters),
        )
        return row

    @staticmethod
    def _offset_columns(
        offsets: dict[TopicPartition, OffsetRange], claims: dict[TopicPartition, Claim]
    ) -> tuple[list[Any], ...]:
        ordered = sorted(offsets)
        unclaimed = [tp for tp in ordered if tp not in claims]
        if unclaimed:
            raise Fenced(unclaimed)
        return (
            [t for t, _ in ordered],
            [p for _, p in ordered],
            [offsets[tp].first for tp in ordered],
            [offsets[tp].next for tp in ordered],
            [claims[tp].fence for tp in ordered],
            [offsets[tp].newest for tp in ordered],
        )


def _raise_if_fenced(row: asyncpg.Record) -> None:
    if row["fenced"]:
        raise Fenced(
            [TopicPartition(t, int(p)) for t, p in (f.rsplit("/", 1) for f in row["fenced"])]
        )


def _count(counts: StreamCounts, readings: Sequence[Reading], stored: int, live: int) -> None:
    counts.stored = stored
    counts.duplicate = len(readings) - stored
    counts.stale = len({r.device_id for r in readings}) - live
