"""Rejects to the dead-letter topic, after their batch committed.

The `dead_letters` table is the record: each reject is written there in its batch's
transaction. The topic is a copy for whatever downstream reads it, published best effort
once the batch has committed; what could not be published is counted
(fleet_dlq_publish_failures_total) and stays in the table.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from consumer import metrics
from consumer.batch import DeadLetter

log = structlog.get_logger(__name__)
_ACK_TIMEOUT_S = 10.0


class DeadLetterPublisher:
    """Publishes committed rejects to the dead-letter topic, with headers `reason` and
    `source` (topic/partition/offset) and the original key and bytes."""

    def __init__(self, producer: AIOKafkaProducer | None, topic: str) -> None:
        self._producer = producer
        self._topic = topic

    async def publish(self, letters: Sequence[DeadLetter]) -> None:
        if self._producer is None or not letters:
            return
        futures: list[Any] = []
        try:
            for letter in letters:
                headers = [
                    ("reason", letter.rejection.reason.value.encode()),
                    ("source", f"{letter.topic}/{letter.partition}/{letter.offset}".encode()),
                ]
                futures.append(
                    await self._producer.send(
                        self._topic, value=letter.payload, key=letter.key, headers=headers
                    )
                )
            await asyncio.wait_for(asyncio.gather(*futures), timeout=_ACK_TIMEOUT_S)
        except (KafkaError, TimeoutError) as exc:
            metrics.DLQ_PUBLISH_FAILURES.inc(len(letters))
            log.warning("dlq_publish_failed", error=repr(exc), count=len(letters))
