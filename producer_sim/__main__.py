"""CLI: ``python -m producer_sim`` publishes a simulated fleet's readings to Kafka.

Backfill mode: ``--rounds`` rounds of readings ending around now (or from ``--start``)
are published as fast as the broker takes them, keyed by device id, and every delivery
is acknowledged (acks=all) before the summary line is printed as JSON on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from consumer.settings import Settings
from producer_sim.fleet import Fleet, encode

TOPIC_MODES = ("mixed", "dedicated")
# Delivery futures held at once (one per record batch, each up to 256 KiB): enough to
# keep every partition busy, few enough to bound memory and surface a failure early.
MAX_BATCHES_IN_FLIGHT = 64


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
) -> int:
    """Publish every reading of the run and wait for all acknowledgements; return the count.

    Records are packed into per-partition batches here rather than sent one by one:
    ``producer.send()`` costs a coroutine and a future per record, which caps a single
    process well below 100,000 readings/s, while ``send_batch`` costs one per batch.
    Partitions are chosen by the producer's own keyed partitioner (murmur2, as Java's),
    so a device lands where any other Kafka client would put it.
    """
    if topics not in TOPIC_MODES:
        raise ValueError(f"topics must be one of {TOPIC_MODES}, not {topics!r}")
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        client_id="fleet-producer-sim",
        acks="all",
        enable_idempotence=idempotent,
        linger_ms=20,
        max_batch_size=256 * 1024,
    )
    try:
        await producer.start()  # inside the try: a failed start still needs stop()
        partitioner = DefaultPartitioner()
        used = (mixed_topic,) if topics == "mixed" else (meter_topic, vehicle_topic)
        partitions = {topic: sorted(await producer.partitions_for(topic)) for topic in used}
        # A device always goes to one topic, so its key alone names the destination.
        destination: dict[bytes, tuple[str, int]] = {}
        open_batches: dict[tuple[str, int], Any] = {}
        in_flight: deque[asyncio.Future[Any]] = deque()
        published = 0

        async def ship(topic: str, partition: int, batch: Any) -> None:
            batch.close()  # a closed batch is sent at once instead of lingering
            in_flight.append(await producer.send_batch(batch, topic, partition=partition))
            while len(in_flight) > MAX_BATCHES_IN_FLIGHT:
                await in_flight.popleft()  # the oldest, normally acknowledged already

        for reading in fleet.readings(start, interval, rounds):
            key, value = encode(reading)
            dest = destination.get(key)
            if dest is None:
                if topics == "mixed":
                    topic = mixed_topic
                else:
                    topic = meter_topic if "meterId" in reading else vehicle_topic
                dest = (topic, partitioner(key, partitions[topic], partitions[topic]))
                destination[key] = dest
            batch = open_batches.get(dest)
            if batch is None:
                batch = open_batches[dest] = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:  # full
                await ship(*dest, batch)
                batch = open_batches[dest] = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
            published += 1

        for dest, batch in open_batches.items():
            if batch.record_count():
                await ship(*dest, batch)
        await asyncio.gather(*in_flight)
        return published
    finally:
        await producer.stop()


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


def _aware_time(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    if value.utcoffset() is None:
        raise argparse.ArgumentTypeError("needs a UTC offset, e.g. 2026-11-27T10:00:00+00:00")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m producer_sim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Brokers without idempotent producers (e.g. the local tansu) need "
        "FLEET_KAFKA_IDEMPOTENT_PRODUCER=false.",
    )
    parser.add_argument("--meters", type=_count(1), default=100)
    parser.add_argument("--vehicles", type=_count(0), default=100)
    parser.add_argument("--rounds", type=_count(0), default=10)
    parser.add_argument("--interval-seconds", type=_positive_seconds, default=60.0)
    parser.add_argument(
        "--start", type=_aware_time, help="time of the first round (default: rounds ending now)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--topics",
        choices=TOPIC_MODES,
        default="mixed",
        help="mixed: everything to the mixed topic; dedicated: meter and vehicle topics",
    )
    parser.add_argument("--bootstrap-servers", help="default: FLEET_KAFKA_BOOTSTRAP_SERVERS")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = Settings()
    fleet = Fleet(args.meters, args.vehicles, args.seed)
    interval = timedelta(seconds=args.interval_seconds)
    start = args.start or datetime.now(UTC).replace(microsecond=0) - args.rounds * interval
    began = time.perf_counter()
    try:
        published = asyncio.run(
            publish(
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
            )
        )
    except KafkaError as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), file=sys.stderr)
        return 1
    seconds = time.perf_counter() - began
    summary = {
        "published": published,
        "meters": args.meters,
        "vehicles": args.vehicles,
        "seconds": round(seconds, 3),
        "readings_per_s": round(published / seconds),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
