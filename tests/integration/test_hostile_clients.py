"""The sidecar under hostile clients: real server processes, real sockets, raw HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import zlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr

from consumer.service import Role, Service
from consumer.settings import Settings
from devtools.factories import meter
from devtools.processes import ConsumerProcess
from devtools.stack import free_port
from tests.conftest import wait_until
from tests.integration.processes import consumer_process

TOKENS = SecretStr("reader-token:read,gateway-token:ingest,ops-token:admin+read,all-token")
READER = {"Authorization": "Bearer reader-token"}
GATEWAY = {"Authorization": "Bearer gateway-token"}
OPS = {"Authorization": "Bearer ops-token"}


async def raw(port: int, request: bytes, *, read_timeout: float = 10.0) -> tuple[int, Any, bytes]:
    """Send bytes as they are; (status, JSON body or None, raw answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), read_timeout)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    return status, parsed, answer


def gzip_bomb(inflated_mib: int) -> bytes:
    """A gzip body of a few hundred KB that inflates to `inflated_mib` MiB of zeros."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    return b"".join(packer.compress(zeros) for _ in range(inflated_mib)) + packer.flush()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[tuple[Settings, ConsumerProcess]]:
    """`run --role api` with scoped tokens, in a process of its own (its CPU and log)."""
    s = settings.model_copy(update={"api_tokens": TOKENS, "api_auth": "tokens"})
    server = consumer_process(s, "api", "--role", "api")
    await wait_until(lambda: _ready(server.http_port), timeout=30)
    yield s, server
    server.kill()


async def _ready(port: int) -> bool:
    try:
        status, _, _ = await raw(
            port, b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
    except OSError:
        return False
    return status == 200


async def test_compressed_bodies_are_refused_unread_and_never_inflated(
    api: tuple[Settings, ConsumerProcess],
) -> None:
    """A gzip body that would inflate to 256 MiB, sent eight times to an open route and to
    ingestion with a token: each is a 415 unsupported_content_encoding, and the server does
    not spend its CPU reading or inflating them (aiohttp would, after answering)."""
    _, server = api
    bomb = gzip_bomb(256)
    before = cpu_seconds(server.process.pid)
    for path, headers in [
        ("/healthz", b""),
        ("/v1/ingestion/telemetry", b"Authorization: Bearer gateway-token\r\n"),
    ] * 4:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Encoding: gzip\r\nContent-Length: {len(bomb)}\r\nConnection: close\r\n"
        ).encode()
        status, body, _ = await raw(server.http_port, head + headers + b"\r\n" + bomb)
        assert (status, body["error"]["code"]) == (415, "unsupported_content_encoding")
    await asyncio.sleep(1)  # what the server would do after answering, it would do now
    spent = cpu_seconds(server.process.pid) - before
    assert spent < 1.5, f"the server spent {spent:.1f} s of CPU on eight refused bodies"


async def test_without_tokens_v1_is_refused_unless_auth_is_off_on_purpose(
    settings: Settings,
) -> None:
    """No FLEET_API_TOKENS: /v1 answers 503 auth_not_configured (health stays open) and
    the start-up log says so; FLEET_API_AUTH=off serves it, with a warning."""
    for auth, expected in (("tokens", 503), ("off", 404)):
        s = settings.model_copy(update={"api_auth": auth})
        server = consumer_process(s, f"auth-{auth}", "--role", "api")
        try:
            await wait_until(lambda p=server.http_port: _ready(p), timeout=30)
            status, body, _ = await raw(
                server.http_port,
                b"GET /v1/vehicles/ev-1/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
        finally:
            server.kill()
        assert status == expected, body
        if auth == "tokens":
            assert body["error"]["code"] == "auth_not_configured"
            assert server.events("api_auth_not_configured")
        else:
            assert server.events("api_auth_off")[0]["level"] == "warning"


async def test_each_token_may_do_what_its_scopes_allow(
    api: tuple[Settings, ConsumerProcess],
) -> None:
    """read: GET only; ingest: POST ingestion only; admin: meter assignments; a token
    without scopes: everything. Missing scope is 403 insufficient_scope."""
    _, server = api
    base = f"http://127.0.0.1:{server.http_port}"
    assignment = {"meterId": "m-1", "from": "2026-11-01T00:00:00Z"}
    calls: list[tuple[str, str, dict[str, str], Any, int]] = [
        ("GET", "/v1/vehicles/ev-1/live", READER, None, 404),
        ("POST", "/v1/ingestion/telemetry", READER, meter("m-1", 0), 403),
        ("PUT", "/v1/vehicles/ev-1/meter", READER, assignment, 403),
        ("GET", "/v1/vehicles/ev-1/live", GATEWAY, None, 403),
        ("POST", "/v1/ingestion/telemetry", GATEWAY, meter("m-1", 0), 202),
        ("PUT", "/v1/vehicles/ev-1/meter", OPS, assignment, 201),
        ("GET", "/v1/vehicles/ev-1/meter", OPS, None, 200),
        ("POST", "/v1/ingestion/telemetry", OPS, meter("m-1", 1), 403),
        (
            "POST",
            "/v1/ingestion/telemetry",
            {"Authorization": "Bearer all-token"},
            meter("m-1", 2),
            202,
        ),
    ]
    async with aiohttp.ClientSession() as http:
        for method, path, headers, body, expected in calls:
            async with http.request(method, base + path, headers=headers, json=body) as resp:
                answer = await resp.json()
                assert resp.status == expected, (method, path, headers, answer)
                if expected == 403:
                    assert answer["error"]["code"] == "insufficient_scope"


async def test_a_deeply_nested_body_is_a_400_on_every_route_that_reads_one(
    api: tuple[Settings, ConsumerProcess],
) -> None:
    """Every body goes through the same bounded parser: 5,000 nested arrays (10 KB) are a
    400 malformed_json, on ingestion and on meter assignments alike, never a 500."""
    _, server = api
    nested = b"[" * 5_000 + b"]" * 5_000
    base = f"http://127.0.0.1:{server.http_port}"
    headers = {"Content-Type": "application/json", "Authorization": "Bearer all-token"}
    async with aiohttp.ClientSession() as http:
        for method, path in (
            ("PUT", "/v1/vehicles/ev-1/meter"),
            ("POST", "/v1/ingestion/telemetry"),
        ):
            async with http.request(method, base + path, data=nested, headers=headers) as resp:
                body = await resp.json()
                assert (resp.status, body["error"]["code"]) == (400, "malformed_json"), path
    assert "Traceback" not in server.output()


async def test_repeated_parameters_and_duplicate_authorization_are_refused(
    api: tuple[Settings, ConsumerProcess],
) -> None:
    """What could be read two ways is refused, not read the first way: a repeated query
    parameter and a second Authorization header are 400s; ids with invisible characters too."""
    _, server = api
    cases = [
        (
            b"GET /v1/analytics/fleet/efficiency?status=fault&status=normal HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer reader-token\r\n\r\n",
            "repeated_parameter",
        ),
        (
            b"GET /v1/vehicles/ev-1/live HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer reader-token\r\n"
            b"Authorization: Bearer nobody\r\n\r\n",
            "duplicate_header",
        ),
        (
            b"GET /v1/vehicles/ev%E2%80%8B1/live HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer reader-token\r\n\r\n",
            "invalid_vehicle_id",
        ),
        (
            b"GET /v1/vehicles/%20/live HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer reader-token\r\n\r\n",
            "invalid_vehicle_id",
        ),
    ]
    for request, code in cases:
        status, body, answer = await raw(
            server.http_port, request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
        )
        assert (status, body["error"]["code"]) == (400, code), answer


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(
            b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", id="oversized line"
        ),
        pytest.param(
            b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nab",
            id="two content lengths",
        ),
        pytest.param(
            b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            id="length and chunked",
        ),
    ],
)
async def test_malformed_http_gets_a_json_error_and_one_log_line(
    api: tuple[Settings, ConsumerProcess], request_bytes: bytes
) -> None:
    """aiohttp's plain-text answer and multi-line traceback become the API's JSON error and
    one structured log line: every line the server logs is a JSON object."""
    _, server = api
    status, body, answer = await raw(server.http_port, request_bytes)
    assert status == 400, answer
    assert body["error"]["code"] == "bad_request"
    assert b"Server: fleet-telemetry\r\n" in answer
    await asyncio.sleep(0.2)
    lines = server.output().splitlines()
    assert all(line.startswith("{") for line in lines), [
        line for line in lines if not line.startswith("{")
    ]
    assert server.events("http_request_malformed")


async def test_slow_headers_idle_sockets_and_stalled_bodies_are_closed(settings: Settings) -> None:
    """A request head sent a byte at a time and a connection that sends nothing are closed
    after the idle timeout; a body that stops arriving gets 408 body_timeout; an address
    with too many connections has the next one closed at once."""
    s = settings.model_copy(
        update={
            "api_tokens": TOKENS,
            "api_auth": "tokens",
            "http_idle_timeout_seconds": 1.0,
            "http_body_timeout_seconds": 1.0,
            "http_max_connections_per_address": 4,
        }
    )
    server = consumer_process(s, "timeouts", "--role", "api")
    try:
        await wait_until(lambda: _ready(server.http_port), timeout=30)
        port = server.http_port

        async def closed_by_server(trickle: bytes) -> bool:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                for byte in trickle:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.25)
                return await asyncio.wait_for(reader.read(), 10) == b""
            except (ConnectionError, OSError):
                return True
            finally:
                writer.close()

        assert await closed_by_server(b"GET /healthz HTTP/1.1\r\nHo")  # 2.5 s for 10 bytes
        assert await closed_by_server(b"")  # says nothing at all

        stalled = (
            b"POST /v1/ingestion/telemetry HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer gateway-token\r\nContent-Length: 1000\r\n\r\n[{"
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(stalled)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b'"body_timeout"' in answer

        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            refused = await asyncio.wait_for(reader.read(), 5) == b""
        except ConnectionError:
            refused = True
        assert refused, "the fifth connection of one address is closed unanswered"
        writer.close()
        for _, w in held:
            w.close()
    finally:
        server.kill()
    assert server.events("http_connection_refused")


async def test_a_client_that_hangs_up_mid_body_is_an_abort_not_a_database_outage(
    settings: Settings,
) -> None:
    """Half a body, then the client is gone: counted as 499 (client closed) and logged as
    request_aborted, never as a 503 or request_database_unavailable."""
    s = settings.model_copy(update={"api_tokens": TOKENS, "api_auth": "tokens"})
    labels = {"route": "/v1/ingestion/telemetry", "method": "POST", "status": "499"}
    unavailable = dict(labels, status="503")
    name = "fleet_http_request_duration_seconds_count"
    aborted_before = REGISTRY.get_sample_value(name, labels) or 0
    unavailable_before = REGISTRY.get_sample_value(name, unavailable) or 0
    service = Service(s, Role.API)
    assert await service.start()
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", s.http_port)
        writer.write(
            b"POST /v1/ingestion/telemetry HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Authorization: Bearer gateway-token\r\nContent-Length: 10000\r\n\r\n[{"meterId"'
        )
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.transport.abort()
        await wait_until(lambda: _counted(name, labels, above=aborted_before), timeout=10)
        assert (REGISTRY.get_sample_value(name, unavailable) or 0) == unavailable_before
    finally:
        await service.stop()


async def _counted(name: str, labels: dict[str, str], above: float) -> bool:
    return (REGISTRY.get_sample_value(name, labels) or 0) > above


def report_settings(settings: Settings, statement_timeout_ms: int) -> Settings:
    return settings.model_copy(
        update={
            "api_tokens": TOKENS,
            "api_auth": "tokens",
            "api_max_concurrent_reports": 2,
            "api_statement_timeout_ms": statement_timeout_ms,
            "rate_limit_burst": 10_000,
        }
    )


@pytest.fixture
async def history_locked(db: asyncpg.Connection) -> AsyncIterator[None]:
    """The hourly totals the fleet report reads (sql/014) locked: every report waits,
    standing for reports that take long."""
    async with db.transaction():
        await db.execute("LOCK TABLE vehicle_hourly IN ACCESS EXCLUSIVE MODE")
        yield


async def test_reports_beyond_the_cap_get_a_fast_503_and_long_ones_are_ended(
    settings: Settings, history_locked: None
) -> None:
    """Twelve fleet reports of twelve windows at once that cannot finish: two run, the other
    ten get 503 overloaded at once; the two are ended by the database at the statement
    timeout (503 query_timeout) instead of holding their connections. (Requests for one
    window share one ranking: they would wait for the same query.)"""
    s = report_settings(settings, statement_timeout_ms=2000)
    service = Service(s, Role.API)
    assert await service.start()
    url = f"http://127.0.0.1:{s.http_port}/v1/analytics/fleet/efficiency"
    try:
        async with aiohttp.ClientSession() as http:

            async def report(hours: int) -> tuple[int, str, str | None]:
                params = {"to": (datetime.now(UTC) - timedelta(hours=hours)).isoformat()}
                async with http.get(url, headers=READER, params=params) as resp:
                    code = (await resp.json())["error"]["code"]
                    return resp.status, code, resp.headers.get("Retry-After")

            answers = await asyncio.gather(*(report(hours) for hours in range(12)))
    finally:
        await service.stop()
    assert answers.count((503, "overloaded", "1")) == 10
    assert answers.count((503, "query_timeout", "5")) == 2


async def test_a_client_that_goes_away_has_its_query_cancelled(
    settings: Settings, db: asyncpg.Connection, history_locked: None
) -> None:
    """A report whose client hangs up does not go on waiting in the database."""
    s = report_settings(settings, statement_timeout_ms=60_000)
    service = Service(s, Role.API)
    assert await service.start()
    url = f"http://127.0.0.1:{s.http_port}/v1/analytics/fleet/efficiency"
    check = await asyncpg.connect(s.database_url.get_secret_value())
    try:
        async with aiohttp.ClientSession() as http:
            pending = asyncio.create_task(http.get(url, headers=READER))
            await wait_until(lambda: _api_queries_waiting(check, 1), timeout=10)
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await wait_until(lambda: _api_queries_waiting(check, 0), timeout=5)
    finally:
        await check.close()
        await service.stop()


async def _api_queries_waiting(db: asyncpg.Connection, n: int) -> bool:
    waiting = await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'fleet-api%' "
        "AND state = 'active' AND wait_event_type = 'Lock'"
    )
    return waiting == n


async def test_the_rate_limit_charges_by_cost_not_by_request(settings: Settings) -> None:
    """A month-long report costs a unit per day, an ingested reading 1/100: a token whose
    burst is 100 gets three month-long reports, then 429 with Retry-After."""
    s = settings.model_copy(
        update={"api_tokens": TOKENS, "api_auth": "tokens", "rate_limit_per_second": 1.0}
    )
    service = Service(s, Role.API)
    assert await service.start()
    params = {"from": "2026-10-01T00:00:00Z", "to": "2026-10-31T00:00:00Z"}
    url = f"http://127.0.0.1:{s.http_port}/v1/analytics/fleet/efficiency"
    try:
        statuses = []
        async with aiohttp.ClientSession() as http:
            for _ in range(4):
                async with http.get(url, headers=READER, params=params) as resp:
                    statuses.append(resp.status)
                    retry_after = resp.headers.get("Retry-After")
    finally:
        await service.stop()
    assert statuses == [200, 200, 200, 429]
    assert retry_after is not None and int(retry_after) >= 1


async def test_metrics_are_cached_briefly_and_can_have_a_port_of_their_own(
    settings: Settings,
) -> None:
    """Two scrapes within a second get the same rendering; with FLEET_METRICS_PORT the
    metrics leave the API port; no answer names aiohttp's or Python's version."""
    metrics_port = free_port()
    s = settings.model_copy(update={"metrics_port": metrics_port})
    service = Service(s, Role.API)
    assert await service.start()
    try:
        async with aiohttp.ClientSession() as http:
            bodies = []
            for _ in range(2):
                async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                    bodies.append(await resp.read())
                    assert resp.headers["Server"] == "fleet-telemetry"
            async with http.get(f"http://127.0.0.1:{s.http_port}/metrics") as resp:
                on_api_port = resp.status
            async with http.get(f"http://127.0.0.1:{s.http_port}/healthz") as resp:
                assert resp.headers["Server"] == "fleet-telemetry"
    finally:
        await service.stop()
    assert bodies[0] == bodies[1]
    assert b"fleet_http_request_duration_seconds" in bodies[0]
    assert on_api_port == 404
