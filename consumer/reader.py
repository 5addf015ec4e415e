"""Reading the claimed partitions into their lanes' stages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import ConsumerStoppedError, NoOffsetForPartitionError, OffsetOutOfRangeError

from consumer.batch import OffsetRange, decode_partition
from consumer.decode import Limits
from consumer.lanes import Lanes
from consumer.models import Stream
from consumer.partitions import PartitionBook
from consumer.store import Claim

log = structlog.get_logger(__name__)

POLL_TIMEOUT_MS = 200  # how long one fetch waits for records when there are none
_PROBE_TIMEOUT_MS = 2000  # how long isolating an undecodable batch waits for a re-fetch
_MAX_FRUITLESS_PROBES = 3  # fetch errors that no single partition reproduces, in a row

Fetched = dict[TopicPartition, list[ConsumerRecord]]


@dataclass(slots=True)
class _Fetch:
    """The one outstanding getmany, with the claims it was asked under."""

    task: asyncio.Task[Fetched]
    claims: dict[TopicPartition, Claim]


class Reader:
    """Reads the claimed partitions into their lanes' stages, decoded.

    One getmany is outstanding at a time: for the claimed partitions whose lane has room,
    at most as many records as the fullest of those lanes can still take, so no batch
    outgrows FLEET_BATCH_MAX_RECORDS. It is never cancelled (aiokafka's getmany is not
    safe to cancel); in flight, it is what keeps the member polling. With every partition
    paused (the database away) it returns nothing, on purpose.

    What a fetch brings is staged only contiguous with the book's position, under the
    claim it was read with (stage()). A record batch the client cannot decode is traced
    to its partition, which is halted there (isolate()). Offsets the broker says are out
    of range are collected in `out_of_range` for the pipeline to recover.
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        book: PartitionBook,
        lanes: Lanes,
        stream_of_topic: Mapping[str, Stream | None],
        limits: Limits,
    ) -> None:
        self.consumer = consumer
        self.book = book
        self.lanes = lanes
        self.stream_of_topic = stream_of_topic
        self.limits = limits
        self.out_of_range: set[TopicPartition] = set()
        self._fetch: _Fetch | None = None
        self._fruitless_probes = 0

    @property
    def in_flight(self) -> asyncio.Task[Fetched] | None:
        return self._fetch.task if self._fetch is not None else None

    def start(self) -> None:
        """Put a getmany in flight, unless one is, or every lane is full (then a write
        finishing is what the loop waits for)."""
        if self._fetch is not None:
            return
        paused = self.consumer.paused()
        partitions = [tp for tp in self.book.claims if tp not in paused and self.lanes.room(tp) > 0]
        if partitions:
            most = min(self.lanes.room(tp) for tp in partitions)
            getmany = self.consumer.getmany(
                *partitions, timeout_ms=POLL_TIMEOUT_MS, max_records=most
            )
        elif self.consumer.assignment() <= paused:
            getmany = self.consumer.getmany(timeout_ms=POLL_TIMEOUT_MS)  # returns nothing
        else:
            return
        self._fetch = _Fetch(asyncio.create_task(getmany), dict(self.book.claims))

    async def take(self) -> bool:
        """Stage what the fetch in flight brought, once it has finished; True if anything."""
        fetch = self._fetch
        if fetch is None or not fetch.task.done():
            return False
        self._fetch = None
        try:
            fetched = fetch.task.result()
        except OffsetOutOfRangeError as exc:
            self.out_of_range.update(exc.args[0] if exc.args else {})
            return False
        except NoOffsetForPartitionError as exc:
            # The client looked for a position before a claim set one (it never uses
            # Kafka's committed offsets): claim again, which seeks to the stored offset.
            for tp in (tp for tp in exc.args if isinstance(tp, TopicPartition)):
                self.set_aside(tp)
            return False
        except ConsumerStoppedError:
            raise
        except Exception as exc:  # a record batch that does not decode, most likely
            await self._isolate(fetch, exc)
            return True
        return self.stage(fetched, fetch.claims)

    async def settle(self) -> None:
        """Let the fetch in flight finish (within its timeout) and stage what it brought.

        Called before every seek: a getmany in flight across a seek would hand back records
        read after it under the claims of before, while the client has moved past them.
        """
        if self._fetch is not None:
            await asyncio.wait({self._fetch.task})
            await self.take()

    async def drain(self) -> None:
        """At shutdown: let the fetch in flight end; what it read is dropped."""
        fetch, self._fetch = self._fetch, None
        if fetch is not None:
            await asyncio.gather(fetch.task, return_exceptions=True)

    def set_aside(self, tp: TopicPartition, after: float = 0.0) -> None:
        """Forget the claim and what is staged of it; still assigned, it waits paused for
        a new claim (`after` seconds from now, unless a rebalance decides first)."""
        assigned = tp in self.consumer.assignment()
        self.book.set_aside(tp, assigned=assigned, after=after)
        self.lanes.of(tp).drop(tp)
        if assigned:
            self.consumer.pause(tp)

    def stage(self, fetched: Fetched, fetched_under: Mapping[TopicPartition, Claim]) -> bool:
        """Decode each partition's records into its lane's stage, contiguous with what
        this member has read of it, or not at all.

        Records read under a claim replaced since (re-claimed, reset) send the client back
        to the book's position. So does a read that starts past it: a batch's offsets then
        cover only what was read, and the fence, which accepts a batch that starts past the
        stored offset, never sees a hole. The broker gets one more look; a gap it confirms
        (offsets without records, such as transaction markers) joins the next batch.
        """
        now = datetime.now(UTC)
        staged = False
        for tp, read in fetched.items():
            claim = self.book.claims.get(tp)
            if not read or claim is None:
                continue  # not ours (any more): whoever claims it seeks to the stored offset
            position = self.book.position(tp)
            if fetched_under.get(tp) is not claim:
                self.consumer.seek(tp, position)  # the client moved past records we drop
                continue
            # Read twice (a seek back over what is staged): keep only what is new.
            records = (
                read if read[0].offset >= position else [r for r in read if r.offset >= position]
            )
            if not records:
                continue
            if records[0].offset > position and self.book.read_again(tp, records[0].offset):
                log.info(
                    "offset_gap_rechecked",
                    topic=tp.topic,
                    partition=tp.partition,
                    position=position,
                    read_from=records[0].offset,
                )
                self.consumer.seek(tp, position)
                continue
            started = time.perf_counter()
            chunk = decode_partition(
                records, self.stream_of_topic[tp.topic], now=now, limits=self.limits
            )
            newest = chunk.offsets[tp].newest
            chunk.offsets[tp] = OffsetRange(position, records[-1].offset + 1, newest)
            self.lanes.of(tp).stage(tp, claim, chunk, started=started)
            self.book.read_to(tp, records[-1].offset + 1)
            staged = True
        return staged

    async def _isolate(self, fetch: _Fetch, error: Exception) -> None:
        """Find the partition whose record batch does not decode and halt it there.

        aiokafka raises from getmany for the whole fetch, and may already have moved the
        positions of what it read before the bad batch: every partition goes back to the
        book's position, then each is read alone, record by record, until one fails where
        its bad batch starts. The rest of that partition's records before it, and every
        other partition, are staged as usual.
        """
        suspects = [tp for tp, claim in fetch.claims.items() if self.book.is_current(tp, claim)]
        for tp in suspects:
            self.consumer.seek(tp, self.book.position(tp))
        culprits = 0
        for tp in suspects:
            highwater = self.consumer.highwater(tp)
            if highwater is not None and highwater <= self.book.position(tp):
                continue  # nothing to read there
            timeout_ms = _PROBE_TIMEOUT_MS
            while self.lanes.room(tp) > 0:
                claim = self.book.claims.get(tp)
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
                self.stage(got, {tp: claim})
                timeout_ms = 0  # the rest of this fetch is buffered
        self._fruitless_probes = 0 if culprits else self._fruitless_probes + 1
        if self._fruitless_probes >= _MAX_FRUITLESS_PROBES:
            raise error  # not a record batch of one partition: let the service stop

    def _halt(self, tp: TopicPartition, error: Exception) -> None:
        reason = f"{type(error).__name__}: {error}"
        self.consumer.pause(tp)
        offset = self.book.halt(tp, reason)
        log.error(
            "partition_halted",
            topic=tp.topic,
            partition=tp.partition,
            offset=offset,
            error=reason,
            action="the records before this offset are stored; this partition is not read "
            "past it until the consumer can decode it (see docs/failures.md)",
        )
