"""poll -> decode -> write -> account, with natural batching, fencing and a clean stop.

One loop keeps one fetch outstanding and feeds write lanes:
- newly assigned partitions stay paused until claimed in PostgreSQL (fence
  bumped, stored offset read) and the consumer has seeked there;
- each partition belongs to one lane; records are decoded as they arrive and
  staged in their lane, at most FLEET_BATCH_MAX_RECORDS per lane;
- natural batching: a free lane writes whatever is staged at once, so at a low
  rate a reading waits for nothing; while a lane writes, the next batch grows in
  its stage, so batches grow with the load, up to the limit;
- a batch is written in one transaction (see consumer.store); when the
  database is unavailable every partition is paused, the loop keeps polling
  so the member stays in the group, and the write is retried with capped,
  jittered backoff until it lands or the partitions move to another member;
- only after the commit: metrics, the Kafka offset commit (for lag tooling)
  and the dead-letter topic;
- a record batch the client cannot decode (corrupt, or compressed with a codec
  it lacks) halts its partition at that offset with one error; the records
  before it and every other partition go on.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import (
    ConsumerStoppedError,
    KafkaError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
)
from aiokafka.structs import OffsetAndMetadata

from consumer import metrics
from consumer.batch import Batch, OffsetRange, decode_partition
from consumer.decode import Limits
from consumer.errors import Fenced, is_transient
from consumer.kafka import PartitionTracker
from consumer.models import Stream
from consumer.settings import Settings
from consumer.store import Claim, Store, WriteResult

log = structlog.get_logger(__name__)
T = TypeVar("T")

_KAFKA_COMMIT_INTERVAL_S = 1.0
_LAG_REPORT_INTERVAL_S = 0.5
_POLL_TIMEOUT_MS = 200  # how long one fetch waits for records when there are none
_PROBE_TIMEOUT_MS = 2000  # how long isolating an undecodable batch waits for a re-fetch
_MAX_FRUITLESS_PROBES = 3  # fetch errors that no single partition reproduces, in a row


@dataclass(slots=True)
class _Lane:
    """One transaction in flight at most, and the records staged for the next."""

    writing: asyncio.Task[None] | None = None
    # partition -> (the claim its records were read under, their decoded chunk)
    staged: dict[TopicPartition, tuple[Claim, Batch]] = field(default_factory=dict)
    staged_records: int = 0
    staged_since: float = 0.0
    decode_seconds: float = 0.0

    def busy(self) -> bool:
        return self.writing is not None and not self.writing.done()

    def take(self) -> list[tuple[TopicPartition, Claim, Batch]]:
        chunks = [(tp, claim, chunk) for tp, (claim, chunk) in self.staged.items()]
        self.staged.clear()
        self.staged_records = 0
        self.decode_seconds = 0.0
        return chunks

    def drop(self, tp: TopicPartition) -> None:
        held = self.staged.pop(tp, None)
        if held is not None:
            self.staged_records -= len(held[1])


@dataclass(slots=True)
class _Fetch:
    """The one outstanding getmany, with the claims it was asked under."""

    task: asyncio.Task[dict[TopicPartition, list[ConsumerRecord]]]
    claims: dict[TopicPartition, Claim]


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        consumer: AIOKafkaConsumer,
        tracker: PartitionTracker,
        producer: AIOKafkaProducer | None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.consumer = consumer
        self.tracker = tracker
        self.producer = producer
        self.stream_of_topic: dict[str, Stream | None] = {
            settings.meter_topic: Stream.METER,
            settings.vehicle_topic: Stream.VEHICLE,
            settings.mixed_topic: None,
        }
        self.limits = Limits.from_settings(settings)
        self.batches_committed = 0
        self._stop = asyncio.Event()
        self._last_kafka_commit = 0.0
        self._kafka_commit_due = False  # offsets stored since the last mirror to Kafka
        self._stored_next: dict[TopicPartition, int] = {}  # what PostgreSQL has
        self._position: dict[TopicPartition, int] = {}  # the next offset to stage
        self._failing_writers = 0  # database calls currently retrying
        self._lanes = [_Lane() for _ in range(settings.write_lanes)]
        self._fetch: _Fetch | None = None
        self._fruitless_probes = 0
        self._gaps: dict[TopicPartition, tuple[int, int]] = {}  # (position, read from) rechecked
        self._lag_reported = 0.0
        self._out_of_range: set[TopicPartition] = set()
        self._topic_index = {topic: i for i, topic in enumerate(self.stream_of_topic)}

    def stop(self) -> None:
        """Ask the loop to finish the batches in flight and return."""
        self._stop.set()

    async def run(self, max_batches: int | None = None, idle_timeout: float | None = None) -> None:
        """Consume until stop(); in bounded mode, also after max_batches or idle_timeout seconds.

        Partitions are spread over write lanes. A lane has at most one transaction
        in flight, on its own connection, and a partition always maps to the same
        lane, so each partition's batches commit in order; lanes write in parallel
        while the loop polls and decodes the next records.
        """
        idle_since = time.monotonic()
        stopping = asyncio.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                if max_batches is not None and self.batches_committed >= max_batches:
                    break
                self._reap_lanes()
                await self._claim_pending()
                await self._recover_out_of_range()
                self._dispatch()
                if await self._poll(stopping):
                    idle_since = time.monotonic()
                elif not self.consumer.assignment() or self._busy():
                    idle_since = time.monotonic()  # waiting for partitions or a write
                elif idle_timeout is not None and time.monotonic() - idle_since > idle_timeout:
                    break
                if time.monotonic() - self._lag_reported > _LAG_REPORT_INTERVAL_S:
                    self._report_lag()
        finally:
            stopping.cancel()
            await self._settle()
        await self._commit_to_kafka(force=True)

    def _busy(self) -> bool:
        return any(lane.busy() or lane.staged for lane in self._lanes)

    def _lane_of(self, tp: TopicPartition) -> _Lane:
        index: int = (tp.partition + self._topic_index[tp.topic]) % len(self._lanes)
        return self._lanes[index]

    def _writes(self) -> set[asyncio.Future[Any]]:
        return {lane.writing for lane in self._lanes if lane.writing and not lane.writing.done()}

    # --- polling and staging ---------------------------------------------------------------

    async def _poll(self, stopping: asyncio.Task[Any]) -> bool:
        """Wait for records, a finished write or stop; stage what arrived. True if any did."""
        self._start_fetch()
        waits = {stopping, *self._writes()}
        if self._fetch is not None:
            waits.add(self._fetch.task)
        await asyncio.wait(
            waits, timeout=_POLL_TIMEOUT_MS / 1000, return_when=asyncio.FIRST_COMPLETED
        )
        return await self._take_fetch()

    def _start_fetch(self) -> None:
        """Keep one getmany outstanding for the claimed partitions whose lane has room.

        An outstanding getmany also keeps the member alive in the group (aiokafka counts
        it as polling); with every partition paused it returns nothing, which is the point
        while the database is away. getmany is never cancelled: it is not safe to.
        """
        if self._fetch is not None:
            return
        limit = self.settings.batch_max_records
        room: dict[int, int] = {}
        partitions: list[TopicPartition] = []
        paused = self.consumer.paused()
        for tp, _claim in self.tracker.claims.items():
            if tp in paused:
                continue
            lane = self._lane_of(tp)
            free = limit - lane.staged_records
            if free > 0:
                partitions.append(tp)
                room[id(lane)] = free
        if partitions:
            getmany = self.consumer.getmany(
                *partitions, timeout_ms=_POLL_TIMEOUT_MS, max_records=min(room.values())
            )
        elif self.consumer.assignment() <= paused:
            getmany = self.consumer.getmany(timeout_ms=_POLL_TIMEOUT_MS)  # returns nothing
        else:
            return  # every lane is full: its write finishing is what the loop waits for
        self._fetch = _Fetch(asyncio.create_task(getmany), dict(self.tracker.claims))

    async def _settle_fetch(self) -> None:
        """Let the outstanding fetch finish (within its timeout) and stage what it read.

        Called before every seek: a getmany in flight across a seek would hand back
        records read after it under the claims of before, which are dropped, while the
        client's position has moved past them.
        """
        if self._fetch is not None:
            await asyncio.wait({self._fetch.task})
            await self._take_fetch()

    async def _take_fetch(self) -> bool:
        """Stage the outstanding fetch's records once it has finished."""
        fetch = self._fetch
        if fetch is None or not fetch.task.done():
            return False
        self._fetch = None
        try:
            fetched = fetch.task.result()
        except OffsetOutOfRangeError as exc:
            self._out_of_range.update(exc.args[0] if exc.args else {})
            return False
        except NoOffsetForPartitionError as exc:
            # The client looked for a position before our claim set one (it never uses
            # Kafka's committed offsets): claim, which seeks to the stored offset.
            lost = [tp for tp in exc.args if isinstance(tp, TopicPartition)]
            self._reclaim_partitions(lost)
            return False
        except ConsumerStoppedError:
            raise
        except Exception as exc:  # a record batch that does not decode, most likely
            await self._isolate_fetch_error(fetch, exc)
            return True
        return self._stage(fetched, fetch.claims)

    def _stage(
        self,
        fetched: dict[TopicPartition, list[ConsumerRecord]],
        fetched_under: dict[TopicPartition, Claim],
    ) -> bool:
        """Decode each partition's records into its lane's stage, contiguous with what
        this member has read of it, or not at all.

        Records read under a claim that has since been replaced (re-claimed, reset) send
        the client back to this member's position. So does a read that starts past it: a
        batch's offsets then cover only what was read, and the fence, which accepts a
        batch that starts past the stored offset, never sees a hole. The broker gets one
        more look; a gap it confirms (offsets that hold no record, such as transaction
        markers) is part of the next batch.
        """
        now = datetime.now(UTC)
        staged = False
        for tp, read in fetched.items():
            claim = self.tracker.claims.get(tp)
            if not read or claim is None:
                continue  # not ours (any more): whoever claims it seeks to the stored offset
            position = self._position[tp]
            if fetched_under.get(tp) is not claim:
                self.consumer.seek(tp, position)  # the client moved past records we drop
                continue
            # Read twice (a seek back over what is staged): keep only what is new.
            records = (
                read if read[0].offset >= position else [r for r in read if r.offset >= position]
            )
            if not records:
                continue
            first = records[0].offset
            if first > position and self._gaps.get(tp) != (position, first):
                self._gaps[tp] = (position, first)
                log.info(
                    "offset_gap_rechecked",
                    topic=tp.topic,
                    partition=tp.partition,
                    position=position,
                    read_from=first,
                )
                self.consumer.seek(tp, position)
                continue
            started = time.perf_counter()
            chunk = decode_partition(
                records, self.stream_of_topic[tp.topic], now=now, limits=self.limits
            )
            chunk.offsets[tp] = OffsetRange(position, records[-1].offset + 1)
            lane = self._lane_of(tp)
            if not lane.staged:
                lane.staged_since = started
            lane.decode_seconds += time.perf_counter() - started
            held = lane.staged.get(tp)
            if held is None:
                lane.staged[tp] = (claim, chunk)
            else:
                held[1].extend(chunk)
            lane.staged_records += len(chunk)
            self._position[tp] = records[-1].offset + 1
            staged = True
        return staged

    async def _isolate_fetch_error(self, fetch: _Fetch, error: Exception) -> None:
        """Find the partition whose record batch does not decode and halt it there.

        aiokafka raises from getmany for the whole fetch, and may already have moved the
        positions of what it read before the bad batch: every partition goes back to what
        was staged, then each is read alone, record by record, until one fails where its
        bad batch starts. The rest of that partition's records before it, and every other
        partition, are staged as usual.
        """
        suspects = [
            tp
            for tp, claim in fetch.claims.items()
            if self.tracker.claims.get(tp) is claim and tp in self._position
        ]
        for tp in suspects:
            self.consumer.seek(tp, self._position[tp])
        culprits = 0
        for tp in suspects:
            highwater = self.consumer.highwater(tp)
            if highwater is not None and highwater <= self._position[tp]:
                continue  # nothing to read there
            timeout_ms = _PROBE_TIMEOUT_MS
            while self._lane_of(tp).staged_records < self.settings.batch_max_records:
                claim = self.tracker.claims.get(tp)
                if claim is None or tp in self.consumer.paused():
                    break
                try:
                    got = await self.consumer.getmany(tp, timeout_ms=timeout_ms, max_records=1)
                except (OffsetOutOfRangeError, NoOffsetForPartitionError, ConsumerStoppedError):
                    raise
                except Exception as exc:
                    self._halt(tp, exc)
                    culprits += 1
                    break
                if not got:
                    break
                self._stage(got, {tp: claim})
                timeout_ms = 0  # the rest of this fetch is buffered
        self._fruitless_probes = 0 if culprits else self._fruitless_probes + 1
        if self._fruitless_probes >= _MAX_FRUITLESS_PROBES:
            raise error  # not a record batch of one partition: let the service stop

    def _halt(self, tp: TopicPartition, error: Exception) -> None:
        offset = self._position[tp]
        self.consumer.pause(tp)
        self.tracker.halt(tp, offset, f"{type(error).__name__}: {error}")
        log.error(
            "partition_halted",
            topic=tp.topic,
            partition=tp.partition,
            offset=offset,
            error=f"{type(error).__name__}: {error}",
            action="the records before this offset are stored; this partition is not read "
            "past it until the consumer can decode it (see docs/failures.md)",
        )

    # --- writing ---------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Every free lane writes what it has staged, under the claims it was read with."""
        for lane in self._lanes:
            if lane.busy() or not lane.staged:
                continue
            timing = {
                "decode_seconds": lane.decode_seconds,
                "queued_seconds": time.perf_counter() - lane.staged_since,
            }
            chunks = [
                (tp, claim, chunk)
                for tp, claim, chunk in lane.take()
                if self.tracker.claims.get(tp) is claim  # else it is read again under the new one
            ]
            if not chunks:
                continue
            batch = Batch.merged(chunk for _, _, chunk in chunks)
            claims = {tp: claim for tp, claim, _ in chunks}
            lane.writing = asyncio.create_task(self._write(batch, claims, timing))

    def _reap_lanes(self) -> None:
        """Re-raise what a finished write could not handle."""
        for lane in self._lanes:
            if lane.writing is not None and lane.writing.done():
                task, lane.writing = lane.writing, None
                task.result()

    async def _settle(self) -> None:
        """Wait for every write in flight, whatever happened to the others, then re-raise
        the first error; staged records are dropped (whoever claims them next reads them
        again). The outstanding fetch ends within its timeout; what it read is dropped too."""
        writes = [lane.writing for lane in self._lanes if lane.writing is not None]
        for lane in self._lanes:
            lane.writing = None
            lane.take()
        fetch, self._fetch = self._fetch, None
        results = await asyncio.gather(*writes, return_exceptions=True)
        if fetch is not None:
            await asyncio.gather(fetch.task, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _write(
        self, batch: Batch, claims: dict[TopicPartition, Claim], timing: dict[str, float]
    ) -> None:
        """Write one batch (retrying while the database is down), then account for it."""
        started = time.perf_counter()
        try:
            result = await self._with_sink_retry(
                lambda: self.store.write(batch, claims), wait=asyncio.sleep
            )
        except Fenced as exc:
            metrics.FENCED_BATCHES.inc()
            log.warning("batch_fenced", partitions=exc.partitions, records=len(batch))
            # Another member claimed them: most likely we were expelled from the group
            # (stopped, partitioned) and will hear so at our next heartbeat. Re-claiming at
            # once would take them back from their new owner; wait out a session timeout.
            # A partition we have re-claimed since was seeked by that claim: leave it be.
            still = [tp for tp, claim in claims.items() if self.tracker.claims.get(tp) is claim]
            self._reclaim_partitions(still, after=self.settings.session_timeout_ms / 1000)
            return
        if result is None:  # stopping while the database is down: the next owner re-reads it
            return
        committed = time.perf_counter()
        self.batches_committed += 1
        self._account(batch, result, write_seconds=committed - started)
        for tp, span in batch.offsets.items():
            self._stored_next[tp] = span.next
        self._kafka_commit_due = True
        await self._commit_to_kafka()
        await self._publish_dead_letters(result)
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

    # --- claims and resets -----------------------------------------------------------------

    async def _claim_pending(self) -> None:
        """Claim newly assigned partitions in PostgreSQL, seek to the stored offsets, resume.

        A rebalance may revoke a partition during any await here: after each one, only
        what is still pending and assigned is acted on.
        """
        while (pending := self.tracker.due()) and not self._stop.is_set():
            claims = await self._with_sink_retry(
                functools.partial(self.store.claim, pending), wait=self._wait_polling
            )
            if claims is None:
                return
            fresh = [tp for tp in self._still_pending(pending) if claims[tp].next_offset is None]
            starts = await self.consumer.beginning_offsets(fresh) if fresh else {}
            await self._settle_fetch()
            claimed = []
            for tp in self._still_pending(pending):
                claim = claims[tp]
                start = claim.next_offset if claim.next_offset is not None else starts.get(tp)
                if start is None:
                    continue  # fresh and assigned only since the lookup: claimed again next round
                self._lane_of(tp).drop(tp)
                self.consumer.seek(tp, start)
                self._stored_next[tp] = self._position[tp] = start
                self.tracker.claimed(tp, claim)
                self.consumer.resume(tp)
                claimed.append(f"{tp.topic}-{tp.partition}")
            log.info("partitions_claimed", partitions=claimed)

    def _still_pending(self, partitions: Iterable[TopicPartition]) -> list[TopicPartition]:
        assigned = self.consumer.assignment()
        return [tp for tp in partitions if tp in self.tracker.pending and tp in assigned]

    async def _recover_out_of_range(self) -> None:
        """Stored offsets outside the log (broker data lost, topic recreated, or retention
        deleted what was not consumed yet): alert, and resume from the log start rather than
        stall. Real Kafka reports it as OffsetOutOfRange; brokers that answer an empty fetch
        instead give themselves away by a high watermark below the stored offset."""
        suspects = set(self._out_of_range)
        self._out_of_range.clear()
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            stored = self._stored_next.get(tp)
            if highwater is not None and stored is not None and stored > highwater:
                suspects.add(tp)
        suspects &= self.consumer.assignment()
        if not suspects:
            return
        # Nothing in flight may advance an offset we are resetting.
        await self._wait_polling_until(
            lambda: not any(lane.busy() for lane in self._lanes), deadline=None
        )
        starts = await self.consumer.beginning_offsets(list(suspects))
        for tp in sorted(suspects):
            claim = self.tracker.claims.get(tp)
            if claim is None or tp not in self.consumer.assignment():
                continue  # not claimed (any more): a claim seeks afresh
            stored, start = self._stored_next.get(tp), starts[tp]
            log.error(
                "offsets_out_of_range",
                topic=tp.topic,
                partition=tp.partition,
                stored_offset=stored,
                log_start=start,
                log_end=self.consumer.highwater(tp),
                action="resuming from the log start",
            )
            metrics.OFFSET_RESETS.labels(tp.topic).inc()
            reset = await self._with_sink_retry(
                functools.partial(self.store.reset_offset, tp, claim, start),
                wait=self._wait_polling,
            )
            if reset is None:
                return  # stopping
            if self.tracker.claims.get(tp) is not claim or tp not in self.consumer.assignment():
                continue  # revoked while resetting
            if not reset:  # another member owns it now
                self._reclaim_partitions([tp])
                continue
            await self._settle_fetch()
            if self.tracker.claims.get(tp) is not claim or tp not in self.consumer.assignment():
                continue  # revoked meanwhile
            self._lane_of(tp).drop(tp)
            self.consumer.seek(tp, start)
            self._stored_next[tp] = self._position[tp] = start
            self.tracker.claimed(tp, Claim(start, claim.fence))  # records read before: dropped

    def _reclaim_partitions(
        self, partitions: Iterable[TopicPartition], *, after: float = 0.0
    ) -> None:
        """Forget our claims; what is still assigned (`after` seconds from now, unless a
        rebalance decides first) is re-claimed and re-read from stored offsets."""
        assigned = self.consumer.assignment()
        for tp in partitions:
            self.tracker.claims.pop(tp, None)
            self._lane_of(tp).drop(tp)
            if tp in assigned:
                self.consumer.pause(tp)
                self.tracker.defer(tp, after)

    # --- the database being away ---------------------------------------------------------

    async def _with_sink_retry(
        self, attempt: Callable[[], Awaitable[T]], wait: Callable[[float], Awaitable[None]]
    ) -> T | None:
        """Run a database call until it succeeds; None when asked to stop while it cannot.

        While it fails, every assigned partition is paused; `wait` passes the time
        (polling, from the loop; sleeping, from a write task while the loop polls).
        """
        delay = self.settings.retry_initial_seconds
        failing = False
        try:
            while True:
                try:
                    result = await attempt()
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    if not failing:
                        failing = True
                        self._failing_writers += 1
                        self.consumer.pause(*self.consumer.assignment())
                        metrics.SINK_AVAILABLE.set(0)
                    metrics.SINK_RETRIES.inc()
                    log.warning(
                        "database_unavailable",
                        error=f"{type(exc).__name__}: {exc}",
                        retry_in_seconds=round(delay, 2),
                    )
                    await wait(random.uniform(0, delay))  # noqa: S311 -- jitter, not crypto
                    delay = min(delay * 2, self.settings.retry_max_seconds)
                    if self._stop.is_set():
                        return None
                    continue
                metrics.SINK_AVAILABLE.set(1)
                return result
        finally:
            if failing:
                self._failing_writers -= 1
            if failing and not self._failing_writers:
                # Resume what is ours and claimed; pending and halted partitions stay paused.
                self.consumer.resume(
                    *(
                        tp
                        for tp in self.consumer.assignment()
                        if tp not in self.tracker.pending and tp not in self.tracker.halted
                    )
                )
                log.info("database_available")

    async def _wait_polling(self, seconds: float) -> None:
        """Wait while polling, so the member is not evicted for not polling."""
        deadline = asyncio.get_running_loop().time() + seconds
        await self._wait_polling_until(lambda: False, deadline)

    async def _wait_polling_until(
        self, condition: Callable[[], bool], deadline: float | None
    ) -> None:
        """Keep a fetch outstanding (staging what it brings) until condition() or deadline."""
        loop = asyncio.get_running_loop()
        while not condition() and not self._stop.is_set():
            remaining = 1.0 if deadline is None else deadline - loop.time()
            if remaining <= 0:
                return
            self._start_fetch()
            waits = self._writes()
            if self._fetch is not None:
                waits.add(self._fetch.task)
            if waits:
                await asyncio.wait(
                    waits, timeout=min(remaining, 1.0), return_when=asyncio.FIRST_COMPLETED
                )
            else:
                await asyncio.sleep(min(remaining, 0.05))
            await self._take_fetch()

    # --- after the commit ------------------------------------------------------------------

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

    async def _commit_to_kafka(self, force: bool = False) -> None:
        """Mirror stored offsets to Kafka for lag tooling; PostgreSQL stays the truth."""
        now = time.monotonic()
        if not self._kafka_commit_due or (
            not force and now - self._last_kafka_commit < _KAFKA_COMMIT_INTERVAL_S
        ):
            return
        offsets = {
            tp: OffsetAndMetadata(self._stored_next[tp], "")
            for tp in self.consumer.assignment()
            if tp in self._stored_next
        }
        self._kafka_commit_due = False
        self._last_kafka_commit = now
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:
            log.info("kafka_commit_skipped", error=repr(exc))  # harmless: PostgreSQL has them

    async def _publish_dead_letters(self, result: WriteResult) -> None:
        if self.producer is None or not result.dead_letters:
            return
        futures: list[Any] = []
        try:
            for letter in result.dead_letters:
                headers = [
                    ("reason", letter.rejection.reason.value.encode()),
                    ("source", f"{letter.topic}/{letter.partition}/{letter.offset}".encode()),
                ]
                futures.append(
                    await self.producer.send(
                        self.settings.dlq_topic,
                        value=letter.payload,
                        key=letter.key,
                        headers=headers,
                    )
                )
            await asyncio.wait_for(asyncio.gather(*futures), timeout=10)
        except (KafkaError, TimeoutError) as exc:
            # Already stored in dead_letters in the same transaction as the offsets.
            metrics.DLQ_PUBLISH_FAILURES.inc(len(result.dead_letters))
            log.warning("dlq_publish_failed", error=repr(exc), count=len(result.dead_letters))

    def _report_lag(self) -> None:
        """Records between the partition's high watermark and what PostgreSQL has stored."""
        self._lag_reported = time.monotonic()
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            stored = self._stored_next.get(tp)
            if highwater is not None and stored is not None:
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(
                    max(0, highwater - stored)
                )
