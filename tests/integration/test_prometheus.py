"""A real Prometheus server scrapes the service and sees the ingestion rate."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from consumer.settings import Settings
from devtools.factories import mixed_fleet
from tests.conftest import wait_until
from tests.integration.helpers import publish_readings, running_service
from tests.integration.processes import running_prometheus

RATE = 'sum(rate(fleet_ingest_records_total{outcome="stored"}[15s]))'


@pytest.fixture
def prometheus(settings: Settings, tmp_path: Path) -> Iterator[str]:
    """A Prometheus server scraping the service every second; its URL."""
    job = {
        "job_name": "fleet",
        "static_configs": [{"targets": [f"127.0.0.1:{settings.http_port}"]}],
    }
    with running_prometheus([job], tmp_path) as url:
        yield url


async def test_prometheus_scrapes_metrics_and_shows_the_ingestion_rate(
    settings: Settings, prometheus: str
) -> None:
    """While readings flow, Prometheus' query API reports a positive stored-readings rate."""
    async with running_service(settings), aiohttp.ClientSession() as http:
        readings = mixed_fleet(20, 20, 6)
        for second in range(6):  # readings keep arriving across several scrapes
            batch = readings[second * 40 : (second + 1) * 40]
            await publish_readings(settings.kafka_bootstrap_servers, settings.mixed_topic, batch)
            await asyncio.sleep(1)

        async def rate() -> float:
            async with http.get(f"{prometheus}/api/v1/query", params={"query": RATE}) as resp:
                result = (await resp.json())["data"]["result"]
            return float(result[0]["value"][1]) if result else 0.0

        assert await wait_until(rate, timeout=30) > 0
