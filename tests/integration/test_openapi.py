"""The OpenAPI document: valid 3.1, complete, and true of the live server (schemathesis).

The app is composed from every route module that exists (the analytics routes
join when consumer.api.analytics is importable), with a real database pool, a
real producer and authentication on; schemathesis then runs, as its CLI, against
the operations that app serves, over a real TCP port.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from consumer.api.app import make_app
from consumer.api.contract import EXAMPLE_ALERT, EXAMPLE_METER, EXAMPLE_SESSION, EXAMPLE_VEHICLE
from consumer.api.deps import DEPS, ApiDeps
from consumer.api.ingestion import PATH
from consumer.api.routes import api_routes
from consumer.api.security import security_middlewares
from consumer.kafka import make_producer
from consumer.settings import Settings
from tests.integration.helpers import consume_until_idle

TOKEN = "schemathesis-token"  # noqa: S105 -- a test credential
SCHEMATHESIS = Path(sys.executable).with_name("st")
# What "conforms" means here. Left out on purpose: positive_data_acceptance (a
# reading valid by the schema can still be refused, e.g. a timestamp far in the
# future) and negative_data_rejection (an array mixing valid and invalid readings
# is accepted in part by design).
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "ignored_auth",
    "unsupported_method",
]


def successes(metrics_text: str) -> dict[tuple[str, str], float]:
    """(route template, method) -> how many 2xx answers fleet_http_request_duration_seconds counted."""
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "fleet_http_request_duration_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count") and sample.labels["status"].startswith("2"):
                key = (sample.labels["route"], sample.labels["method"].lower())
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def served_operations(app: web.Application) -> set[tuple[str, str]]:
    """(path template, method) of every route the app serves; HEAD comes with GET."""
    return {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }


@pytest.fixture
async def live_api(settings: Settings, database: str) -> AsyncIterator[TestClient[Any, Any]]:
    configured = settings.model_copy(
        update={
            "api_tokens": SecretStr(TOKEN),
            "rate_limit_per_second": 10_000.0,  # schemathesis is not the subject of this test
            "rate_limit_burst": 10_000,
        }
    )
    pool = await asyncpg.create_pool(database, min_size=1, max_size=4)
    producer = make_producer(configured)
    await producer.start()
    app = make_app(
        {},
        deps=ApiDeps(configured, pool=pool, producer=producer),
        routes=api_routes(),
        middlewares=security_middlewares(configured),
    )
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    yield client
    await client.close()
    await producer.stop()
    await pool.close()


async def test_document_is_valid_openapi_3_1(live_api: TestClient[Any, Any]) -> None:
    """GET /openapi.json serves a document that an OpenAPI 3.1 validator accepts."""
    response = await live_api.get("/openapi.json")
    assert response.status == 200
    document = await response.json()
    assert document["openapi"].startswith("3.1")
    validate(document)


async def document(client: TestClient[Any, Any]) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status == 200
    body: dict[str, Any] = await response.json()
    return body


async def test_document_describes_every_served_route(live_api: TestClient[Any, Any]) -> None:
    """Every route the composed app serves has an operation in the document."""
    paths = (await document(live_api))["paths"]
    documented = {(path, method) for path, operations in paths.items() for method in operations}
    assert served_operations(live_api.app) <= documented


async def seed_session_and_alert(dsn: str, now: datetime) -> None:
    """A session and an alert under the document's example ids (the worker derives its own)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO charging_sessions (session_id, vehicle_id, meter_id, started_at, ended_at,"
            " state, kwh_delivered_dc, kwh_consumed_ac, efficiency_ratio, status, soc_start,"
            " soc_end, max_battery_temp, readings)"
            " VALUES ($1, $2, $3, $4, $4, 'closed', 1.2, 1.3, 0.9231, 'normal', 55, 55, 26.5, 1)",
            EXAMPLE_SESSION,
            EXAMPLE_VEHICLE,
            EXAMPLE_METER,
            now - timedelta(hours=2),
        )
        await conn.execute(
            "INSERT INTO alerts (alert_id, kind, subject, state, opened_at, evidence)"
            " VALUES ($1, 'device_silent', $2, 'open', $3, '{}')",
            EXAMPLE_ALERT,
            EXAMPLE_METER,
            now - timedelta(hours=2),
        )
    finally:
        await conn.close()


@pytest.mark.timeout(400)
async def test_live_server_conforms_to_the_document(
    live_api: TestClient[Any, Any], tmp_path: Path
) -> None:
    """Schemathesis finds no 5xx and no response outside the documented statuses, types and headers.

    The readings of the document's example vehicle and meter are ingested and
    consumed first, so every operation is also seen succeeding, not only refusing.
    """
    now = datetime.now(UTC).replace(microsecond=0)
    readings = [
        {
            "meterId": EXAMPLE_METER,
            "kwhConsumedAc": 1.3,
            "voltage": 230.0,
            "timestamp": (now - timedelta(hours=1)).isoformat(),
        },
        {
            "vehicleId": EXAMPLE_VEHICLE,
            "soc": 55.0,
            "kwhDeliveredDc": 1.2,
            "batteryTemp": 26.5,
            "timestamp": (now - timedelta(hours=1)).isoformat(),
        },
    ]
    seeded = await live_api.post(PATH, json=readings, headers={"Authorization": f"Bearer {TOKEN}"})
    assert seeded.status == 202
    await consume_until_idle(live_api.app[DEPS].settings)  # the examples' ids now have data
    await seed_session_and_alert(live_api.app[DEPS].settings.database_url.get_secret_value(), now)

    # The stream never ends, so schemathesis cannot judge an answer; test_stream covers it.
    served = served_operations(live_api.app) - {("/v1/stream", "get")}
    paths = (await document(live_api))["paths"]
    operation_ids = [
        paths[path][method]["operationId"] for path, method in sorted(served) if path in paths
    ]
    base = str(live_api.make_url(""))
    before = successes(await (await live_api.get("/metrics")).text())
    command = [
        str(SCHEMATHESIS),
        "run",
        f"{base}/openapi.json",
        f"--url={base}",
        f"--header=Authorization: Bearer {TOKEN}",
        f"--checks={','.join(CHECKS)}",
        "--max-examples=40",
        "--seed=20260101",
        "--workers=1",
        "--request-timeout=10",
        *(f"--include-operation-id={op}" for op in operation_ids),
    ]
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=tmp_path,  # its hypothesis database and any report stay out of the repository
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=360)
    text = output.decode(errors="replace")
    print(text)  # shown when the test fails
    assert process.returncode == 0, text[-4000:]
    after = successes(await (await live_api.get("/metrics")).text())
    redirects = {("/", "get"), ("/console", "get")}  # answer 302 only
    assert {op for op in served if after.get(op, 0) > before.get(op, 0)} == served - redirects
