"""Keeps the live stream's change log (sql/016) to its replay window.

Run by the consuming roles beside history maintenance, every tenth of
FLEET_STREAM_REPLAY_SECONDS: the log grows by a row or two per batch, and what is older than
the window is only there for clients resuming from further back, who get a `reset` anyway.
A failure is logged and counted, and the next round tries again.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import structlog

from consumer import metrics
from consumer.settings import Settings
from consumer.store import Store

log = structlog.get_logger(__name__)


async def prune_stream_forever(store: Store, settings: Settings) -> None:
    keep = timedelta(seconds=settings.stream_replay_seconds)
    while True:
        try:
            await store.prune_stream(keep)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            metrics.MAINTENANCE_ERRORS.inc()
            log.warning("stream_pruning_failed", error=f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(settings.stream_replay_seconds / 10)
