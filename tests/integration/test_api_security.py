"""Authentication, rate limiting and request metrics, through a live server and a real broker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr

from consumer.api.app import make_app
from consumer.api.deps import ApiDeps
from consumer.api.ingestion import PATH, ingestion_routes
from consumer.api.openapi import openapi_routes
from consumer.api.security import MAX_CLIENTS, TokenBuckets, security_middlewares
from consumer.errors import ConfigError
from consumer.settings import Settings
from devtools.factories import meter

TOKENS = SecretStr(" alpha-token-1234, beta-token-5678")
ALPHA = {"Authorization": "Bearer alpha-token-1234"}
BETA = {"Authorization": "Bearer beta-token-5678"}
OPEN_PATHS = ["/healthz", "/readyz", "/metrics", "/openapi.json"]


async def thing(request: web.Request) -> web.Response:
    return web.json_response({"thingId": request.match_info["thingId"]})


@pytest.fixture
async def serve(settings: Settings, producer: AIOKafkaProducer) -> AsyncIterator[Any]:
    """serve(**settings changes) -> a client of the app with those settings, on a local port."""
    clients: list[TestClient[Any, Any]] = []

    async def start(**changes: Any) -> TestClient[Any, Any]:
        configured = settings.model_copy(update=changes)
        app = make_app(
            {},
            deps=ApiDeps(configured, producer=producer),
            routes=[*ingestion_routes(), *openapi_routes(), web.get("/v1/things/{thingId}", thing)],
            middlewares=security_middlewares(configured),
        )
        client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()


async def test_missing_or_wrong_token_is_401_with_a_bearer_challenge(serve: Any) -> None:
    """With tokens configured, /v1 without a valid bearer token gets 401 unauthorized and WWW-Authenticate."""
    client = await serve(api_tokens=TOKENS)
    attempts: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer alpha-token-123"},  # a prefix of a real one
        {"Authorization": "Basic YWxwaGEtdG9rZW4tMTIzNDo="},
        {"Authorization": "alpha-token-1234"},
    ]
    for headers in attempts:
        response = await client.post(PATH, json=meter("m-1", 0), headers=headers)
        assert response.status == 401, headers
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert (await response.json())["error"]["code"] == "unauthorized"
    unknown = await client.get("/v1/no-such-route")
    assert unknown.status == 401  # no route discovery without a token


async def test_any_configured_token_is_accepted(serve: Any) -> None:
    """Each configured token (case-insensitive scheme) opens the API: 202 from ingestion."""
    client = await serve(api_tokens=TOKENS)
    for headers in (ALPHA, BETA, {"Authorization": "bearer beta-token-5678"}):
        response = await client.post(PATH, json=meter("m-1", 0), headers=headers)
        assert response.status == 202
    assert (await client.get("/v1/things/t-1", headers=ALPHA)).status == 200


@pytest.mark.parametrize("path", OPEN_PATHS)
async def test_health_metrics_and_openapi_stay_open(serve: Any, path: str) -> None:
    """Probes, scrapes and the API description need no token even when authentication is on."""
    client = await serve(api_tokens=TOKENS)
    assert (await client.get(path)).status == 200


async def test_without_tokens_v1_is_open_only_when_auth_is_turned_off(serve: Any) -> None:
    """No FLEET_API_TOKENS: /v1 is refused (503 auth_not_configured) unless FLEET_API_AUTH=off."""
    closed = await serve(api_auth="tokens")
    refused = await closed.post(PATH, json=meter("m-1", 0))
    assert (refused.status, (await refused.json())["error"]["code"]) == (503, "auth_not_configured")
    assert (await closed.get("/healthz")).status == 200
    opened = await serve(api_auth="off")
    assert (await opened.post(PATH, json=meter("m-1", 0))).status == 202


async def test_tokens_never_reach_the_logs(serve: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Neither a rejected nor an accepted token is written to the service's output."""
    client = await serve(api_tokens=TOKENS)
    await client.post(PATH, json=meter("m-1", 0), headers={"Authorization": "Bearer guess-9876"})
    await client.post(PATH, json=meter("m-1", 0), headers=ALPHA)
    await client.post(PATH, data=b"{", headers=ALPHA | {"Content-Type": "application/json"})
    output = "".join(capsys.readouterr())
    assert "telemetry_ingested" in output  # the log is captured here
    assert "guess-9876" not in output
    assert "alpha-token-1234" not in output


async def test_a_client_over_its_burst_gets_429_with_retry_after(serve: Any) -> None:
    """After rate_limit_burst requests a client gets 429 rate_limited and a whole-second Retry-After."""
    client = await serve(api_tokens=TOKENS, rate_limit_per_second=0.5, rate_limit_burst=3)
    for _ in range(3):
        assert (await client.get("/v1/things/t-1", headers=ALPHA)).status == 200
    limited = await client.get("/v1/things/t-1", headers=ALPHA)
    assert limited.status == 429
    assert (await limited.json())["error"]["code"] == "rate_limited"
    assert int(limited.headers["Retry-After"]) >= 1


async def test_clients_have_their_own_buckets_and_probes_are_never_throttled(serve: Any) -> None:
    """One token's empty bucket does not throttle another token, nor health and metrics."""
    client = await serve(api_tokens=TOKENS, rate_limit_per_second=0.5, rate_limit_burst=2)
    statuses = [(await client.get("/v1/things/t-1", headers=ALPHA)).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert (await client.get("/v1/things/t-1", headers=BETA)).status == 200
    for path in OPEN_PATHS:
        assert (await client.get(path)).status == 200


async def test_guessed_tokens_share_the_address_bucket(serve: Any) -> None:
    """Wrong tokens are throttled by peer address, so guessing tokens soon gets 429 instead of 401."""
    client = await serve(api_tokens=TOKENS, rate_limit_per_second=0.5, rate_limit_burst=3)
    statuses = [
        (await client.get("/v1/things/t-1", headers={"Authorization": f"Bearer guess-{i}"})).status
        for i in range(5)
    ]
    assert statuses == [401, 401, 401, 429, 429]


def test_buckets_refill_at_the_rate_and_memory_stays_bounded() -> None:
    """A bucket refills at rate per second up to burst, and at most max_clients buckets are kept."""
    buckets = TokenBuckets(rate=2.0, burst=2, max_clients=3)
    assert [buckets.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.5]
    assert buckets.take("a", 0.5) == 0.0  # one token back after 0.5 s
    for client in ("b", "c", "d"):
        buckets.take(client, 1.0)
    assert len(buckets) == 3  # "a", the least recently seen, was evicted
    default = TokenBuckets(rate=1.0, burst=1)
    for i in range(MAX_CLIENTS + 5):
        default.take(f"peer:{i}", 0.0)
    assert len(default) == MAX_CLIENTS == 10_000


async def test_request_durations_are_labelled_by_route_template_not_path(serve: Any) -> None:
    """fleet_http_request_duration_seconds carries the route template, method and status, never ids."""
    client = await serve(api_tokens=TOKENS)
    await client.get("/v1/things/device-secret-42", headers=ALPHA)
    await client.post(PATH, json=meter("m-1", 0), headers=ALPHA)
    await client.get("/v1/things/device-secret-42")  # 401
    await client.get("/nowhere/device-secret-43")  # 404, no route
    text = await (await client.get("/metrics")).text()
    for labels in (
        'method="GET",route="/v1/things/{thingId}",status="200"',
        'method="POST",route="/v1/ingestion/telemetry",status="202"',
        'method="GET",route="/v1/things/{thingId}",status="401"',
        'method="GET",route="unmatched",status="401"',
    ):
        assert f"fleet_http_request_duration_seconds_count{{{labels}}}" in text, labels
    assert "device-secret" not in text
    assert 'fleet_http_ingest_items_total{outcome="accepted"}' in text


def test_tokens_set_to_nothing_refuse_to_start() -> None:
    """FLEET_API_TOKENS set but holding no token fails at start-up instead of leaving the API open."""
    with pytest.raises(ConfigError, match="holds no token"):
        security_middlewares(Settings(api_tokens=SecretStr(" , ")))
