"""A real Prometheus server scrapes the service and sees the ingestion rate."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from consumer.devstack import free_port, wait_for_port
from consumer.settings import Settings
from tests.conftest import wait_until
from tests.integration.helpers import mixed_fleet, publish_readings, running_service

RATE = 'sum(rate(fleet_ingest_records_total{outcome="stored"}[15s]))'


@pytest.fixture
def prometheus(settings: Settings, tmp_path: Path) -> Iterator[str]:
    """A Prometheus server (Debian's package) scraping the service every second; its URL."""
    binary = os.environ.get("FLEET_TEST_PROMETHEUS") or shutil.which("prometheus")
    if not binary:
        pytest.fail(
            "needs a Prometheus server: apt-get install prometheus (or FLEET_TEST_PROMETHEUS)"
        )
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: fleet\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{settings.http_port}']}}]\n"
    )
    with (tmp_path / "prometheus.log").open("wb") as log:
        server = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(port, timeout=30)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            server.wait(timeout=10)


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
