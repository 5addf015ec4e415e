"""History maintenance: monthly partitions prepared ahead, retention, the default partition.

Runs once at start and then every FLEET_MAINTENANCE_INTERVAL_SECONDS, supervised: a
failure of any kind is logged, counted (fleet_maintenance_errors_total) and retried at
the next interval, never the end of the task; fleet_maintenance_last_success_timestamp_seconds
tells an alert when partitions have not been prepared for too long.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import structlog

from consumer import metrics
from consumer.settings import Settings
from consumer.store import Store

log = structlog.get_logger(__name__)


class HistoryMaintenance:
    """Keeps history's monthly partitions ready and applies retention; owns no connection
    (it borrows the store's pool) and is run by the service in the consuming roles."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    async def run_once(self) -> None:
        """Prepare monthly partitions ahead, drop those past retention, watch the default."""
        s = self.settings
        months_back = s.partitions_months_back
        if s.history_retention_days is not None:  # do not re-create what retention drops
            months_back = min(months_back, s.history_retention_days // 31)
        created = await self.store.prepare_partitions(months_back, s.partitions_months_ahead)
        if created:
            log.info("history_partitions_prepared", created=created)
        if s.history_retention_days is not None:
            cutoff = datetime.now(UTC) - timedelta(days=s.history_retention_days)
            dropped = await self.store.drop_history_before(cutoff)
            if dropped:
                metrics.HISTORY_PARTITIONS_DROPPED.inc(len(dropped))
                log.info(
                    "history_partitions_dropped", partitions=dropped, before=cutoff.isoformat()
                )
        meters, vehicles = await self.store.default_partition_rows()
        metrics.HISTORY_DEFAULT_ROWS.labels("meter").set(meters)
        metrics.HISTORY_DEFAULT_ROWS.labels("vehicle").set(vehicles)

    async def supervise(self) -> None:
        """run_once() now and every interval, whatever a run raises; until cancelled."""
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                metrics.MAINTENANCE_ERRORS.inc()
                log.error(  # noqa: TRY400 -- one line with the reason; a traceback helps nobody here
                    "history_maintenance_failed",
                    error=f"{type(exc).__name__}: {exc}",
                    retry_in_seconds=self.settings.maintenance_interval_seconds,
                )
            else:
                metrics.MAINTENANCE_LAST_SUCCESS.set_to_current_time()
            await asyncio.sleep(self.settings.maintenance_interval_seconds)
