"""CLI: ``python -m producer_sim`` publishes a simulated fleet's readings to Kafka.

Backfill mode: ``--rounds`` rounds of readings ending around now (or from ``--start``)
are published as fast as the broker takes them, keyed by device id, and every delivery
is acknowledged (acks=all) before the summary line is printed as JSON on stdout.
Real-time mode (``--realtime``): one round per interval on the wall clock, from now.

Fault flags inject failing chargers, bad messages, duplicates, late readings and
skewed clocks (see producer_sim.faults); ``--truth FILE`` writes what was injected.
A progress line is shown on a terminal; Ctrl-C stops cleanly, acknowledges what was
sent and prints the summary (exit status 130).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from consumer.errors import ConfigError
from consumer.kafka import security_kwargs
from consumer.settings import Settings
from producer_sim.assignments import write_assignments
from producer_sim.faults import Faults, FaultyRun, Truth
from producer_sim.fleet import FAILING_EFFICIENCY, Fleet, Reading, encode

TOPIC_MODES = ("mixed", "dedicated")
# Delivery futures held at once (one per record batch, each up to 256 KiB): enough to
# keep every partition busy, few enough to bound memory and surface a failure early.
MAX_BATCHES_IN_FLIGHT = 64
_RATE_STEP = 500  # messages sent between two checks of a --rate


class _Sender:
    """Packs records into per-partition batches and keeps a bounded number in flight."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        partitions: dict[str, list[int]],
        topic_of: Callable[[bool], str],
        progress: Callable[[int], None] | None,
    ) -> None:
        self.producer, self.partitions, self.topic_of = producer, partitions, topic_of
        self.progress = progress
        self.partitioner = DefaultPartitioner()
        # A device always goes to one topic, so its key alone names the destination.
        self.destination: dict[bytes, tuple[str, int]] = {}
        self.open_batches: dict[tuple[str, int], Any] = {}
        self.in_flight: deque[asyncio.Future[Any]] = deque()
        self.sent = 0

    def add(self, key: bytes, value: bytes, is_meter: bool) -> tuple[str, int, Any] | None:
        """Append one record; a batch it filled is returned, for ``ship``, and a new one opened.

        Not a coroutine: one per record would cost as much as the record itself.
        """
        dest = self.destination.get(key)
        if dest is None:
            topic = self.topic_of(is_meter)
            partitions = self.partitions[topic]
            dest = self.destination[key] = (topic, self.partitioner(key, partitions, partitions))
        batch = self.open_batches.get(dest)
        if batch is None:
            batch = self.open_batches[dest] = self.producer.create_batch()
        self.sent += 1
        if batch.append(key=key, value=value, timestamp=None) is not None:
            return None
        full = batch
        batch = self.open_batches[dest] = self.producer.create_batch()
        batch.append(key=key, value=value, timestamp=None)
        return (*dest, full)

    async def flush(self) -> None:
        """Send every open batch and wait until all are acknowledged."""
        for dest, batch in self.open_batches.items():
            if batch.record_count():
                await self.ship(*dest, batch)
        self.open_batches.clear()
        await asyncio.gather(*self.in_flight)
        self.in_flight.clear()

    async def ship(self, topic: str, partition: int, batch: Any) -> None:
        batch.close()  # a closed batch is sent at once instead of lingering
        self.in_flight.append(await self.producer.send_batch(batch, topic, partition=partition))
        while len(self.in_flight) > MAX_BATCHES_IN_FLIGHT:
            await self.in_flight.popleft()  # the oldest, normally acknowledged already
        if self.progress is not None:
            self.progress(self.sent)


async def publish(  # noqa: PLR0917 -- positional order is the contract callers use
    bootstrap_servers: str,
    fleet: Fleet,
    start: datetime,
    interval: timedelta,
    rounds: int,
    topics: str,
    meter_topic: str,
    vehicle_topic: str,
    mixed_topic: str,
    idempotent: bool,
    *,
    faults: Faults | None = None,
    truth: Truth | None = None,
    now: datetime | None = None,
    realtime: bool = False,
    progress: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
    security: Mapping[str, Any] | None = None,
    rate: float | None = None,
) -> int:
    """Publish every message of the run and wait for all acknowledgements; return the count.

    Without ``faults`` the messages are the fleet's readings, one each. With them, the
    run is a ``FaultyRun`` (anchored at ``now``, default the current time) and ``truth``,
    when given, is filled with what was injected. ``realtime`` sends round k no earlier
    than k intervals after the first (backfill, the default, sends as fast as the broker
    takes it). ``progress`` is called with the running count as batches are handed over.
    Once ``stop`` is set no further message is taken; what was taken is still
    acknowledged, and that count is returned. ``security`` is the producer's transport
    (``consumer.kafka.security_kwargs``); default: plaintext. ``rate`` caps a backfill at
    that many messages per second, sent in small steps: readings that keep arriving.

    Records are packed into per-partition batches here rather than sent one by one:
    ``producer.send()`` costs a coroutine and a future per record, which caps a single
    process well below 100,000 readings/s, while ``send_batch`` costs one per batch.
    Partitions are chosen by the producer's own keyed partitioner (murmur2, as Java's),
    so a device lands where any other Kafka client would put it.
    """
    if topics not in TOPIC_MODES:
        raise ValueError(f"topics must be one of {TOPIC_MODES}, not {topics!r}")
    run: FaultyRun | None = None
    messages: Iterable[tuple[bytes, bytes, bool]]
    if faults is None and not realtime:
        messages = _plain(fleet.readings(start, interval, rounds))
    else:  # a run without faults is the plain run, with rounds to pace by
        messages = run = FaultyRun(
            fleet,
            start,
            interval,
            rounds,
            faults or Faults(),
            now=now or datetime.now(UTC),
            mixed=topics == "mixed",
            truth=truth,
        )
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        **(security or {}),
        client_id="fleet-producer-sim",
        acks="all",
        enable_idempotence=idempotent,
        linger_ms=20,
        max_batch_size=256 * 1024,
    )
    stop = stop or asyncio.Event()
    try:
        await producer.start()  # inside the try: a failed start still needs stop()
        used = (mixed_topic,) if topics == "mixed" else (meter_topic, vehicle_topic)
        partitions = {topic: sorted(await producer.partitions_for(topic)) for topic in used}
        sender = _Sender(
            producer,
            partitions,
            lambda is_meter: (
                mixed_topic if topics == "mixed" else (meter_topic if is_meter else vehicle_topic)
            ),
            progress,
        )
        paced = run if realtime else None
        began, current = asyncio.get_running_loop().time(), 0
        for key, value, is_meter in messages:
            if paced is not None and paced.round != current:
                current = paced.round  # a new round: send the last, wait for its time
                await sender.flush()
                if progress is not None:
                    progress(sender.sent)
                due = began + current * interval.total_seconds()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), due - asyncio.get_running_loop().time())
            if stop.is_set():
                break
            full = sender.add(key, value, is_meter)
            if full is not None:
                await sender.ship(*full)
            if rate is not None and sender.sent % _RATE_STEP == 0:
                await sender.flush()
                ahead = began + sender.sent / rate - asyncio.get_running_loop().time()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), ahead)
        await sender.flush()
        return sender.sent
    finally:
        await producer.stop()


def _plain(readings: Iterable[Reading]) -> Iterator[tuple[bytes, bytes, bool]]:
    for reading in readings:
        key, value = encode(reading)
        yield key, value, "meterId" in reading


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value

    return parse


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:  # also rejects NaN
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def _positive_rate(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):  # also rejects NaN
        raise argparse.ArgumentTypeError("must be a positive number of messages per second")
    return value


def _aware_time(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    if value.utcoffset() is None:
        raise argparse.ArgumentTypeError("needs a UTC offset, e.g. 2026-11-27T10:00:00+00:00")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise argparse.ArgumentTypeError("must be a share between 0 and 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m producer_sim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Brokers without idempotent producers (e.g. the local tansu) need "
        "FLEET_KAFKA_IDEMPOTENT_PRODUCER=false.",
    )
    parser.add_argument("--meters", type=_count(1), default=10_000)
    parser.add_argument("--vehicles", type=_count(0), default=10_000)
    parser.add_argument("--rounds", type=_count(0), default=10)
    parser.add_argument("--interval-seconds", type=_positive_seconds, default=60.0)
    parser.add_argument(
        "--start",
        type=_aware_time,
        help="time of the first round (default: rounds ending now; --realtime: now)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--topics",
        choices=TOPIC_MODES,
        default="mixed",
        help="mixed: everything to the mixed topic; dedicated: meter and vehicle topics",
    )
    parser.add_argument("--bootstrap-servers", help="default: FLEET_KAFKA_BOOTSTRAP_SERVERS")
    parser.add_argument(
        "--rate",
        type=_positive_rate,
        metavar="PER_SECOND",
        help="backfill at most this many messages per second (default: as fast as possible)",
    )
    parser.add_argument(
        "--realtime",
        action="store_true",
        help="one round per interval on the wall clock (default: backfill, as fast as possible)",
    )
    faults = parser.add_argument_group("faults (shares between 0 and 1; all off by default)")
    faults.add_argument("--failing-chargers", type=_share, default=0.0, help="share of meters")
    faults.add_argument(
        "--fail-from-round", type=_count(0), help="round the chargers fail at (default: middle)"
    )
    faults.add_argument(
        "--failing-efficiency", type=_share, default=FAILING_EFFICIENCY, help="default: %(default)s"
    )
    faults.add_argument(
        "--bad-messages", type=_share, default=0.0, help="extra malformed messages per reading"
    )
    faults.add_argument("--duplicates", type=_share, default=0.0, help="re-sent copies per reading")
    faults.add_argument("--late", type=_share, default=0.0, help="share of readings held back")
    faults.add_argument(
        "--late-rounds", type=_count(1), default=3, help="rounds a late reading is held back"
    )
    faults.add_argument(
        "--skewed-devices", type=_share, default=0.0, help="share of devices with a skewed clock"
    )
    faults.add_argument(
        "--skew-seconds",
        type=float,
        default=30.0,
        help="their clock offset; keep it within the consumer's limit (default: %(default)s)",
    )
    faults.add_argument(
        "--overheating-batteries",
        type=_share,
        default=0.0,
        help="share of vehicles whose pack reports 60 degC and more for a few rounds",
    )
    faults.add_argument(
        "--silent-devices",
        type=_share,
        default=0.0,
        help="share of devices that stop sending, each at a round in the run's second half",
    )
    out = parser.add_argument_group("outputs")
    out.add_argument("--truth", type=Path, metavar="FILE", help="write what was injected as JSON")
    out.add_argument(
        "--assignments-dsn",
        metavar="DSN",
        help="write the vehicle->meter assignments (from the run's start) to this database",
    )
    out.add_argument(
        "--print-assignments", action="store_true", help="print them, one JSON line per vehicle"
    )
    return parser


def _faults(args: argparse.Namespace) -> Faults | None:
    """The faults asked for, or None (the plain, fastest path) when none is and no truth either."""
    faults = Faults(  # built first: it validates every fault flag, used or not
        failing_chargers=args.failing_chargers,
        fail_from=args.fail_from_round,
        failing_efficiency=args.failing_efficiency,
        bad_messages=args.bad_messages,
        duplicates=args.duplicates,
        late=args.late,
        late_rounds=args.late_rounds,
        skewed_devices=args.skewed_devices,
        skew=timedelta(seconds=args.skew_seconds),
        overheating_batteries=args.overheating_batteries,
        silent_devices=args.silent_devices,
    )
    rates = (
        args.failing_chargers,
        args.bad_messages,
        args.duplicates,
        args.late,
        args.overheating_batteries,
        args.silent_devices,
    )
    if not any((*rates, args.skewed_devices)) and args.truth is None:
        return None
    return faults


class _Progress:
    """One line on a terminal, rewritten at most every half second; silent otherwise."""

    def __init__(self, began: float) -> None:
        self.began, self.shown = began, 0.0
        self.enabled = sys.stderr.isatty()

    def __call__(self, sent: int) -> None:
        now = time.perf_counter()
        if not self.enabled or now - self.shown < 0.5:
            return
        self.shown = now
        rate = sent / max(now - self.began, 1e-9)
        print(f"\r{sent:,} messages  {rate:,.0f}/s", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled and self.shown:
            print(file=sys.stderr)


async def _main(
    args: argparse.Namespace, settings: Settings, faults: Faults | None
) -> dict[str, Any]:
    fleet = Fleet(args.meters, args.vehicles, args.seed)
    interval = timedelta(seconds=args.interval_seconds)
    now = datetime.now(UTC).replace(microsecond=0)
    start = args.start or (now if args.realtime else now - args.rounds * interval)
    if args.print_assignments:
        for vehicle, meter in fleet.charger.items():
            print(
                json.dumps({"vehicleId": vehicle, "meterId": meter, "validFrom": start.isoformat()})
            )
    summary: dict[str, Any] = {}
    if args.assignments_dsn:
        summary["assignments_written"] = await write_assignments(
            args.assignments_dsn, fleet.charger, start
        )
    truth = Truth()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
        loop.add_signal_handler(signal.SIGINT, stop.set)
    began = time.perf_counter()
    progress = _Progress(began)
    try:
        published = await publish(
            args.bootstrap_servers or settings.kafka_bootstrap_servers,
            fleet,
            start,
            interval,
            args.rounds,
            args.topics,
            settings.meter_topic,
            settings.vehicle_topic,
            settings.mixed_topic,
            settings.kafka_idempotent_producer,
            faults=faults,
            truth=truth,
            now=now,
            realtime=args.realtime,
            progress=progress,
            stop=stop,
            rate=args.rate,
            security=security_kwargs(settings, "simulator"),  # FLEET_KAFKA_SECURITY_* etc.
        )
    finally:
        progress.done()
        with contextlib.suppress(NotImplementedError):
            loop.remove_signal_handler(signal.SIGINT)
    seconds = time.perf_counter() - began
    if faults is not None and args.truth:
        args.truth.write_text(truth.to_json() + "\n")
    summary |= {
        "published": published,
        "meters": args.meters,
        "vehicles": args.vehicles,
        "seconds": round(seconds, 3),
        "readings_per_s": round(published / seconds) if seconds > 0 else 0,
    }
    if faults is not None:
        summary |= {
            "bad_messages": sum(truth.bad_messages.values()),
            "duplicates": truth.duplicates,
            "late_readings": truth.late_readings,
            "faulty_vehicles": len(truth.faulty_vehicles),
        }
    if stop.is_set():
        summary["interrupted"] = True
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        faults = _faults(args)
    except ValueError as exc:
        parser.error(str(exc))
    settings = Settings()
    # stdout carries the summary; warnings (an insecure Kafka transport, say) go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    try:
        summary = asyncio.run(_main(args, settings, faults))
    except (KafkaError, OSError, asyncpg.PostgresError, ConfigError) as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 130 if summary.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
