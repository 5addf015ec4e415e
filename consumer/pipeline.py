"""poll -> decode -> write -> account, with backpressure, fencing and a clean stop.

One loop, one batch in hand at a time:
- newly assigned partitions stay paused until claimed in PostgreSQL (fence
  bumped, stored offset read) and the consumer has seeked there;
- a batch is written in one transaction (see consumer.store); when the
  database is unavailable every partition is paused, the loop keeps polling
  so the member stays in the group, and the write is retried with capped,
  jittered backoff until it lands or the partitions move to another member;
- only after the commit: metrics, the Kafka offset commit (for lag tooling)
  and the dead-letter topic.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, NoOffsetForPartitionError, OffsetOutOfRangeError
from aiokafka.structs import OffsetAndMetadata

from consumer import metrics
from consumer.batch import Batch, Message, build_batch
from consumer.decode import Limits
from consumer.errors import Fenced, is_transient
from consumer.kafka import PartitionTracker
from consumer.models import Stream
from consumer.settings import Settings
from consumer.store import Claim, Store, WriteResult

log = structlog.get_logger(__name__)
T = TypeVar("T")

_KAFKA_COMMIT_INTERVAL_S = 1.0


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
        self._stored_next: dict[tuple[str, int], int] = {}
        self._failing_writers = 0  # database calls currently retrying
        self._lanes: list[asyncio.Task[None] | None] = [None] * settings.write_lanes
        self._out_of_range: set[TopicPartition] = set()
        self._topic_index = {topic: i for i, topic in enumerate(self.stream_of_topic)}

    def stop(self) -> None:
        """Ask the loop to finish the batch in hand and return."""
        self._stop.set()

    async def run(self, max_batches: int | None = None, idle_timeout: float | None = None) -> None:
        """Consume until stop(); in bounded mode, also after max_batches or idle_timeout seconds.

        Partitions are spread over write lanes. A lane has at most one transaction
        in flight, on its own connection, and a partition always maps to the same
        lane, so each partition's batches commit in order; lanes write in parallel
        while the loop polls and decodes the next records.
        """
        idle_since = time.monotonic()
        lanes = self._lanes
        try:
            while not self._stop.is_set():
                if max_batches is not None and self.batches_committed >= max_batches:
                    break
                await self._claim_pending()
                await self._recover_out_of_range()
                polling = time.perf_counter()
                messages = await self._poll()
                if not messages:
                    self._report_lag()
                    writing = any(task is not None and not task.done() for task in lanes)
                    if not self.consumer.assignment() or writing:
                        idle_since = time.monotonic()  # waiting for partitions or a write
                    elif idle_timeout is not None and time.monotonic() - idle_since > idle_timeout:
                        break
                    continue
                idle_since = time.monotonic()
                poll_seconds = time.perf_counter() - polling
                for lane, lane_messages in self._by_lane(messages).items():
                    started = time.perf_counter()
                    batch = build_batch(
                        lane_messages,
                        self.stream_of_topic,
                        now=datetime.now(UTC),
                        limits=self.limits,
                    )
                    timing = {
                        "poll_seconds": poll_seconds,
                        "decode_seconds": time.perf_counter() - started,
                    }
                    previous = lanes[lane]
                    if previous is not None:
                        waiting = time.perf_counter()
                        await self._finish(previous)
                        timing["wait_seconds"] = time.perf_counter() - waiting
                    # Claims as of now, after the lane's previous batch settled: a
                    # partition that batch lost, or re-claimed later, fails the fence.
                    claims = dict(self.tracker.claims)
                    lanes[lane] = asyncio.create_task(self._write(batch, claims, timing))
                    await asyncio.sleep(0)  # let it put the batch on the wire before decoding on
        finally:
            for task in lanes:
                if task is not None:
                    await self._finish(task)
        await self._commit_to_kafka(force=True)

    def _by_lane(self, messages: list[Message]) -> dict[int, list[Message]]:
        lanes: dict[int, list[Message]] = {}
        count = self.settings.write_lanes
        for msg in messages:
            lane = (msg.partition + self._topic_index[msg.topic]) % count
            lanes.setdefault(lane, []).append(msg)
        return lanes

    async def _finish(self, writing: asyncio.Task[None]) -> None:
        """Wait for a batch in flight; while the database is down, keep polling (all paused)."""
        while not writing.done():
            await asyncio.wait({writing}, timeout=1.0)
            if self._failing_writers and not writing.done():
                await self._poll_paused()
        writing.result()  # re-raise what the write could not handle

    async def _poll(self) -> list[Message]:
        """Gather records until the batch is full or its wait time is up."""
        max_records = self.settings.batch_max_records * self.settings.write_lanes
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.batch_max_wait_ms / 1000
        messages: list[Message] = []
        while len(messages) < max_records and not self._stop.is_set():
            remaining_ms = int((deadline - loop.time()) * 1000)
            if remaining_ms <= 0:
                break
            try:
                fetched = await self.consumer.getmany(
                    timeout_ms=remaining_ms, max_records=max_records - len(messages)
                )
            except OffsetOutOfRangeError as exc:
                self._out_of_range.update(exc.args[0] if exc.args else {})
                break
            except NoOffsetForPartitionError as exc:
                # The client looked for a position before our claim set one (it never uses
                # Kafka's committed offsets): claim, which seeks to the stored offset.
                lost = [tp for tp in exc.args if isinstance(tp, TopicPartition)]
                self._reclaim_partitions((tp.topic, tp.partition) for tp in lost)
                break
            for records in fetched.values():
                messages.extend(records)
            if self.tracker.due():
                break  # a rebalance happened: claim before reading on
        return messages

    async def _write(
        self, batch: Batch, claims: dict[tuple[str, int], Claim], timing: dict[str, float]
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
            self._reclaim_partitions(batch.offsets, after=self.settings.session_timeout_ms / 1000)
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
        self._report_lag()
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

    async def _claim_pending(self) -> None:
        """Claim newly assigned partitions in PostgreSQL, seek to the stored offsets, resume."""
        while (pending := self.tracker.due()) and not self._stop.is_set():
            claims = await self._with_sink_retry(
                functools.partial(self.store.claim, [(tp.topic, tp.partition) for tp in pending]),
                wait=self._idle_in_group,
            )
            if claims is None:
                return
            assigned = self.consumer.assignment()
            for tp in pending:
                if tp not in self.tracker.pending or tp not in assigned:
                    continue  # revoked (or re-assigned) while we were claiming
                claim = claims[(tp.topic, tp.partition)]
                if claim.next_offset is None:
                    await self.consumer.seek_to_beginning(tp)
                else:
                    self.consumer.seek(tp, claim.next_offset)
                self.tracker.claimed(tp, claim)
                self._stored_next[(tp.topic, tp.partition)] = claim.next_offset or 0
                self.consumer.resume(tp)
            log.info("partitions_claimed", partitions=[f"{t}-{p}" for t, p in claims])

    async def _recover_out_of_range(self) -> None:
        """Stored offsets outside the log (broker data lost, topic recreated, or retention
        deleted what was not consumed yet): alert, and resume from the log start rather than
        stall. Real Kafka reports it as OffsetOutOfRange; brokers that answer an empty fetch
        instead give themselves away by a high watermark below the stored offset."""
        suspects = set(self._out_of_range)
        self._out_of_range.clear()
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            stored = self._stored_next.get((tp.topic, tp.partition))
            if highwater is not None and stored is not None and stored > highwater:
                suspects.add(tp)
        suspects &= self.consumer.assignment()
        if not suspects:
            return
        for task in self._lanes:  # nothing in flight may advance an offset we are resetting
            if task is not None:
                await self._finish(task)
        starts = await self.consumer.beginning_offsets(list(suspects))
        for tp in sorted(suspects):
            key = (tp.topic, tp.partition)
            claim = self.tracker.claims.get(key)
            if claim is None:
                continue  # not claimed yet: the claim seeks afresh
            stored, start = self._stored_next.get(key), starts[tp]
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
                functools.partial(self.store.reset_offset, key, claim, start),
                wait=self._idle_in_group,
            )
            if reset is None:
                return  # stopping
            if not reset:  # another member owns it now
                self._reclaim_partitions([key])
                continue
            self.consumer.seek(tp, start)
            self._stored_next[key] = start

    def _reclaim_partitions(
        self, partitions: Iterable[tuple[str, int]], *, after: float = 0.0
    ) -> None:
        """Forget our claims; what is still assigned (`after` seconds from now, unless a
        rebalance decides first) is re-claimed and re-read from stored offsets."""
        assigned = self.consumer.assignment()
        for topic, partition in partitions:
            tp = TopicPartition(topic, partition)
            self.tracker.claims.pop((topic, partition), None)
            if tp in assigned:
                self.consumer.pause(tp)
                self.tracker.defer(tp, after)

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
                # Resume what is ours and claimed; pending partitions wait for their claim.
                self.consumer.resume(
                    *(tp for tp in self.consumer.assignment() if tp not in self.tracker.pending)
                )
                log.info("database_available")

    async def _idle_in_group(self, seconds: float) -> None:
        """Wait while polling, so the member is not evicted for not polling."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (remaining := deadline - loop.time()) > 0 and not self._stop.is_set():
            await self._poll_paused(min(remaining, 1.0))

    async def _poll_paused(self, seconds: float = 0.0) -> None:
        """Poll with every partition paused: returns nothing, keeps the membership alive."""
        self.consumer.pause(*self.consumer.assignment())
        fetched = await self.consumer.getmany(timeout_ms=int(seconds * 1000))
        if any(fetched.values()):  # cannot happen while paused; never drop records silently
            raise RuntimeError("records returned for paused partitions")

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
            tp: OffsetAndMetadata(self._stored_next[(tp.topic, tp.partition)], "")
            for tp in self.consumer.assignment()
            if (tp.topic, tp.partition) in self._stored_next
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
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            stored = self._stored_next.get((tp.topic, tp.partition))
            if highwater is not None and stored is not None:
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(
                    max(0, highwater - stored)
                )
