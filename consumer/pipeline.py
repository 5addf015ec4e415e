"""The consumer's loop: claim, read, write, account; natural batching and a clean stop."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from consumer import metrics
from consumer.batch import Batch
from consumer.dead_letters import DeadLetterPublisher
from consumer.decode import Limits
from consumer.errors import Fenced
from consumer.lanes import Lanes
from consumer.models import Stream
from consumer.partitions import PartitionBook
from consumer.reader import POLL_TIMEOUT_MS, Reader
from consumer.settings import Settings
from consumer.sink import SinkRetry
from consumer.store import Claim, Store, WriteResult

log = structlog.get_logger(__name__)

_KAFKA_COMMIT_INTERVAL_S = 1.0
_LAG_REPORT_INTERVAL_S = 0.5


class Pipeline:
    """Consumes this member's partitions into PostgreSQL, exactly once.

    The commit contract, for every partition and every batch:

    1. Claim. A newly assigned partition stays paused until it is claimed in PostgreSQL
       (its fence token bumped, its stored offset read) and the client has seeked there;
       no seek happens with a fetch in flight (PartitionBook, Reader.settle).
    2. Read. Records are staged in the partition's lane only contiguous with what this
       member has read of it, under the claim they were read with (Reader.stage).
    3. Write. A free lane writes what it has staged at once (natural batching: batches
       grow only while the lane is busy, up to FLEET_BATCH_MAX_RECORDS), as one batch
       with the claims it was read under, in one transaction: fence, history, live,
       dead letters and offsets together or not at all (Store.write).
    4. After the commit: the book's stored offsets, metrics, the offsets mirrored to
       Kafka for lag tooling, the dead-letter topic. Nothing here can undo step 3.
    5. Fenced: the batch wrote nothing. Its partitions, unless claimed again since, are
       set aside for a session timeout and then claimed again, re-read from the stored
       offsets (another member most likely owns them now).
    6. The database away: every partition is held (paused), the loop keeps polling so
       the member stays in the group, and each call is retried (SinkRetry).

    Owns the lanes, the reader and the loop; called by Service.run, which stops it.
    A bounded run (max_batches, idle_timeout) lets tests drive the real loop.
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        consumer: AIOKafkaConsumer,
        book: PartitionBook,
        producer: AIOKafkaProducer | None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.consumer = consumer
        self.book = book
        stream_of_topic: dict[str, Stream | None] = {
            settings.meter_topic: Stream.METER,
            settings.vehicle_topic: Stream.VEHICLE,
            settings.mixed_topic: None,
        }
        self.lanes = Lanes(settings.write_lanes, list(stream_of_topic), settings.batch_max_records)
        self.reader = Reader(
            consumer, book, self.lanes, stream_of_topic, Limits.from_settings(settings)
        )
        self._stop = asyncio.Event()
        self.sink = SinkRetry(settings, hold=self._hold, release=self._release, stopping=self._stop)
        self.dead_letters = DeadLetterPublisher(producer, settings.dlq_topic)
        self.batches_committed = 0
        self._mirrored_at = 0.0
        self._mirror_due = False  # offsets stored since the last mirror to Kafka
        self._lag_reported_at = 0.0

    def stop(self) -> None:
        """Ask the loop to finish the batches in flight and return."""
        self._stop.set()

    async def run(self, max_batches: int | None = None, idle_timeout: float | None = None) -> None:
        """Consume until stop(); in bounded mode, also after max_batches or idle_timeout seconds."""
        idle_since = time.monotonic()
        stopping = asyncio.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                if max_batches is not None and self.batches_committed >= max_batches:
                    break
                self._reap()
                await self._claim_pending()
                await self._recover_out_of_range()
                self._dispatch()
                if await self._read(stopping):
                    idle_since = time.monotonic()
                elif not self.consumer.assignment() or self.lanes.busy():
                    idle_since = time.monotonic()  # waiting for partitions or a write
                elif idle_timeout is not None and time.monotonic() - idle_since > idle_timeout:
                    break
                if time.monotonic() - self._lag_reported_at > _LAG_REPORT_INTERVAL_S:
                    self._report_lag()
        finally:
            stopping.cancel()
            await self._settle()
        await self._mirror_offsets(force=True)

    async def _read(self, stopping: asyncio.Task[Any]) -> bool:
        """Wait for records, a finished write or stop; stage what arrived. True if any did."""
        self.reader.start()
        waits: set[asyncio.Future[Any]] = {stopping, *self.lanes.writes()}
        if self.reader.in_flight is not None:
            waits.add(self.reader.in_flight)
        await asyncio.wait(
            waits, timeout=POLL_TIMEOUT_MS / 1000, return_when=asyncio.FIRST_COMPLETED
        )
        return await self.reader.take()

    # --- Step 1: claims, and resets of offsets the broker no longer has ------------------

    async def _claim_pending(self) -> None:
        """Claim newly assigned partitions, seek to the stored offsets, resume.

        A rebalance may revoke a partition during any await here: after each one, only
        what is still pending and assigned is acted on.
        """
        while (pending := self.book.due(self.consumer.assignment())) and not self._stop.is_set():
            claims = await self.sink.run(
                functools.partial(self.store.claim, pending), wait=self._wait_polling
            )
            if claims is None:
                return
            fresh = [tp for tp in self._still_pending(pending) if claims[tp].next_offset is None]
            starts = await self.consumer.beginning_offsets(fresh) if fresh else {}
            await self.reader.settle()
            claimed = []
            for tp in self._still_pending(pending):
                claim = claims[tp]
                start = claim.next_offset if claim.next_offset is not None else starts.get(tp)
                if start is None:
                    continue  # fresh and assigned only since the lookup: claimed again next round
                self.lanes.of(tp).drop(tp)
                self.consumer.seek(tp, start)
                self.book.claimed(tp, claim, start)
                self.consumer.resume(tp)
                claimed.append(f"{tp.topic}-{tp.partition}")
            log.info("partitions_claimed", partitions=claimed)

    def _still_pending(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        assigned = self.consumer.assignment()
        return [tp for tp in partitions if tp in self.book.pending and tp in assigned]

    async def _recover_out_of_range(self) -> None:
        """Stored offsets outside the log (broker data lost, topic recreated, or retention
        deleted what was not consumed yet): alert, and resume from the log start rather than
        stall. Real Kafka reports it as OffsetOutOfRange; brokers that answer an empty fetch
        instead give themselves away by a high watermark below the stored offset."""
        assigned = self.consumer.assignment()
        suspects = (
            self.reader.out_of_range | self.book.stored_past(self.consumer.highwater, assigned)
        ) & assigned
        self.reader.out_of_range.clear()
        if not suspects:
            return
        # Nothing in flight may advance an offset we are resetting.
        await self._wait_polling_until(lambda: not self.lanes.writes(), deadline=None)
        starts = await self.consumer.beginning_offsets(list(suspects))
        for tp in sorted(suspects):
            claim = self.book.claims.get(tp)
            if claim is None or tp not in self.consumer.assignment():
                continue  # not claimed (any more): a claim seeks afresh
            start = starts[tp]
            log.error(
                "offsets_out_of_range",
                topic=tp.topic,
                partition=tp.partition,
                stored_offset=self.book.stored(tp),
                log_start=start,
                log_end=self.consumer.highwater(tp),
                action="resuming from the log start",
            )
            metrics.OFFSET_RESETS.labels(tp.topic).inc()
            reset = await self.sink.run(
                functools.partial(self.store.reset_offset, tp, claim, start),
                wait=self._wait_polling,
            )
            if reset is None:
                return  # stopping
            if not self.book.is_current(tp, claim) or tp not in self.consumer.assignment():
                continue  # revoked while resetting
            if not reset:  # another member owns it now
                self.reader.set_aside(tp)
                continue
            await self.reader.settle()
            if not self.book.is_current(tp, claim) or tp not in self.consumer.assignment():
                continue  # revoked meanwhile
            self.lanes.of(tp).drop(tp)
            self.consumer.seek(tp, start)
            self.book.reset(tp, start)

    # --- Step 3: writing -----------------------------------------------------------------

    def _dispatch(self) -> None:
        """Every free lane writes what it has staged, under the claims it was read with."""
        for lane in self.lanes:
            if lane.busy() or not lane.staged:
                continue
            timing = {
                "decode_seconds": lane.decode_seconds,
                "queued_seconds": time.perf_counter() - lane.staged_since,
            }
            chunks = [
                (tp, claim, chunk)
                for tp, claim, chunk in lane.take()
                if self.book.is_current(tp, claim)  # else it is read again under the new one
            ]
            if not chunks:
                continue
            batch = Batch.merged(chunk for _, _, chunk in chunks)
            claims = {tp: claim for tp, claim, _ in chunks}
            lane.writing = asyncio.create_task(self._write(batch, claims, timing))

    def _reap(self) -> None:
        """Re-raise what a finished write could not handle."""
        for lane in self.lanes:
            if lane.writing is not None and lane.writing.done():
                task, lane.writing = lane.writing, None
                task.result()

    async def _settle(self) -> None:
        """Wait for every write in flight, whatever happened to the others, then re-raise
        the first error; staged records are dropped (whoever claims them next reads them
        again), and so is what the fetch in flight brings."""
        writes = [lane.writing for lane in self.lanes if lane.writing is not None]
        for lane in self.lanes:
            lane.writing = None
            lane.take()
        results = await asyncio.gather(*writes, return_exceptions=True)
        await self.reader.drain()
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _write(
        self, batch: Batch, claims: dict[TopicPartition, Claim], timing: dict[str, float]
    ) -> None:
        """Write one batch (retrying while the database is down), then account for it."""
        started = time.perf_counter()
        try:
            result = await self.sink.run(lambda: self.store.write(batch, claims), asyncio.sleep)
        except Fenced as exc:
            # Step 5. Another member claimed them: most likely we were expelled from the
            # group (stopped, partitioned) and will hear so at our next heartbeat. Claiming
            # again at once would take them back from their new owner: wait a session
            # timeout. A partition claimed again since was seeked by that claim: leave it.
            metrics.FENCED_BATCHES.inc()
            log.warning("batch_fenced", partitions=exc.partitions, records=len(batch))
            for tp, claim in claims.items():
                if self.book.is_current(tp, claim):
                    self.reader.set_aside(tp, after=self.settings.session_timeout_ms / 1000)
            return
        if result is None:  # stopping while the database is down: the next owner re-reads it
            return
        # Step 4.
        committed = time.perf_counter()
        self.batches_committed += 1
        self.book.committed(batch.offsets)
        self._account(batch, result, write_seconds=committed - started)
        self._mirror_due = True
        await self._mirror_offsets()
        await self.dead_letters.publish(result.dead_letters)
        counts = result.counts
        log.info(
            "batch_committed",
            records=len(batch),
            stored=sum(c.stored for c in counts.values()),
            duplicates=sum(c.duplicate for c in counts.values()),
            stale=sum(c.stale for c in counts.values()),
            rejected=len(result.dead_letters),
            partitions=len(batch.offsets),
            committed_earlier=result.committed_earlier,  # by an attempt whose answer was lost
            write_seconds=round(committed - started, 4),
            **{name: round(seconds, 4) for name, seconds in timing.items()},
        )

    # --- Step 6: the database away ---------------------------------------------------

    def _hold(self) -> None:
        self.consumer.pause(*self.consumer.assignment())

    def _release(self) -> None:
        """Resume what is claimed and not halted; pending partitions wait for their claim."""
        self.consumer.resume(
            *(
                tp
                for tp in self.consumer.assignment()
                if tp in self.book.claims and tp not in self.book.halted
            )
        )

    async def _wait_polling(self, seconds: float) -> None:
        """Wait while polling, so the member is not evicted for not polling."""
        deadline = asyncio.get_running_loop().time() + seconds
        await self._wait_polling_until(lambda: False, deadline)

    async def _wait_polling_until(self, done: Callable[[], bool], deadline: float | None) -> None:
        """Keep a fetch in flight (staging what it brings) until done() or the deadline."""
        loop = asyncio.get_running_loop()
        while not done() and not self._stop.is_set():
            remaining = 1.0 if deadline is None else deadline - loop.time()
            if remaining <= 0:
                return
            self.reader.start()
            waits = self.lanes.writes()
            if self.reader.in_flight is not None:
                waits.add(self.reader.in_flight)
            if waits:
                await asyncio.wait(
                    waits, timeout=min(remaining, 1.0), return_when=asyncio.FIRST_COMPLETED
                )
            else:
                await asyncio.sleep(min(remaining, 0.05))
            await self.reader.take()

    # --- Step 4: after the commit ------------------------------------------------------

    def _account(self, batch: Batch, result: WriteResult, write_seconds: float) -> None:
        for stream, counts in result.counts.items():
            for outcome, n in (
                ("stored", counts.stored),
                ("duplicate", counts.duplicate),
                ("stale", counts.stale),
            ):
                if n:
                    metrics.INGEST_RECORDS.labels(stream.value, outcome).inc(n)
        for letter in result.dead_letters:
            label = letter.rejection.stream.value if letter.rejection.stream else "unknown"
            metrics.INGEST_RECORDS.labels(label, "rejected").inc()
        metrics.BATCH_RECORDS.observe(len(batch))
        metrics.BATCH_WRITE_SECONDS.observe(write_seconds)
        newest = max(
            (r.timestamp for readings in batch.readings.values() for r in readings), default=None
        )
        if newest is not None:
            metrics.FRESHNESS_SECONDS.observe(
                max(0.0, (datetime.now(UTC) - newest).total_seconds())
            )

    async def _mirror_offsets(self, force: bool = False) -> None:
        """Mirror stored offsets to Kafka for lag tooling (once a second at most);
        PostgreSQL stays the truth."""
        now = time.monotonic()
        if not self._mirror_due or (
            not force and now - self._mirrored_at < _KAFKA_COMMIT_INTERVAL_S
        ):
            return
        offsets = self.book.stored_offsets(self.consumer.assignment())
        self._mirror_due = False
        self._mirrored_at = now
        if not offsets:
            return
        try:
            await self.consumer.commit({tp: OffsetAndMetadata(n, "") for tp, n in offsets.items()})
        except KafkaError as exc:
            log.info("kafka_commit_skipped", error=repr(exc))  # harmless: PostgreSQL has them

    def _report_lag(self) -> None:
        self._lag_reported_at = time.monotonic()
        self.book.report_lag(self.consumer.highwater, self.consumer.assignment())
