"""Request metrics, rate limiting and bearer authentication, as aiohttp middlewares.

make_app puts json_errors outermost; these go inside it, in this order:

    request_metrics        every request's duration by route template, method and status
    rate_limit(settings)   a token bucket per client; 429 with Retry-After
    bearer_auth(settings)  a configured bearer token, compared in constant time; 401

Metrics see every outcome, 401 and 429 included. Rate limiting runs before
authentication, so a client guessing tokens is throttled by its address.
Health, readiness, metrics and the OpenAPI document are open and never
throttled: probes and scrapes must not depend on credentials or load.
"""

from __future__ import annotations

import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from consumer.api.app import failure_status
from consumer.api.errors import ApiError, error_body
from consumer.errors import ConfigError
from consumer.metrics import HTTP_REQUEST_SECONDS
from consumer.settings import Settings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})
MAX_CLIENTS = 10_000
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def security_middlewares(settings: Settings) -> list[Middleware]:
    """The three middlewares in their intended order, for make_app(middlewares=...)."""
    return [request_metrics, rate_limit(settings), bearer_auth(settings)]


@web.middleware
async def request_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Observe fleet_http_request_duration_seconds{route, method, status}."""
    started = time.perf_counter()
    try:
        response = await handler(request)
    except (ApiError, web.HTTPException) as exc:
        _observe(request, exc.status, started)
        raise
    except Exception as exc:
        _observe(request, failure_status(exc), started)  # what json_errors answers
        raise
    _observe(request, response.status, started)
    return response


def _observe(request: web.Request, status: int, started: float) -> None:
    resource = request.match_info.route.resource
    route = "unmatched" if resource is None else resource.canonical  # never the raw path
    method = request.method if request.method in _METHODS else "OTHER"
    HTTP_REQUEST_SECONDS.labels(route, method, str(status)).observe(time.perf_counter() - started)


def bearer_auth(settings: Settings) -> Middleware:
    """401 unless `Authorization: Bearer <one of settings.api_tokens>`; off when none is set."""
    tokens = configured_tokens(settings)

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if tokens and request.path not in OPEN_PATHS and _token_index(request, tokens) is None:
            return _error(
                401,
                "unauthorized",
                "a valid bearer token is required",
                {"WWW-Authenticate": "Bearer"},
            )
        return await handler(request)

    return auth


def rate_limit(settings: Settings) -> Middleware:
    """429 with Retry-After once a client has used up its bucket.

    A client is its bearer token when that token is valid (by position, so the
    secret is not kept as a key), else its peer address.
    """
    tokens = configured_tokens(settings)
    buckets = TokenBuckets(settings.rate_limit_per_second, settings.rate_limit_burst)

    @web.middleware
    async def limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        index = _token_index(request, tokens)
        client = f"token:{index}" if index is not None else f"peer:{request.remote}"
        wait = buckets.take(client, time.monotonic())
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            return _error(
                429,
                "rate_limited",
                f"too many requests; retry in {seconds} s",
                {"Retry-After": str(seconds)},
            )
        return await handler(request)

    return limit


class TokenBuckets:
    """A token bucket per client, in an LRU of at most max_clients: the idlest go first."""

    def __init__(self, rate: float, burst: int, max_clients: int = MAX_CLIENTS) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, updated

    def take(self, client: str, now: float) -> float:
        """0 when the request may go ahead (one token taken), else seconds until it may."""
        tokens, updated = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - updated) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self._buckets[client] = (tokens, now)  # re-inserted: now the most recently used
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)


def configured_tokens(settings: Settings) -> list[bytes]:
    """The bearer tokens from settings.api_tokens; empty when authentication is off."""
    if settings.api_tokens is None:
        return []
    raw = settings.api_tokens.get_secret_value().split(",")
    tokens = [t.strip().encode() for t in raw if t.strip()]
    if not tokens:
        raise ConfigError("FLEET_API_TOKENS is set but holds no token")
    return tokens


def _token_index(request: web.Request, tokens: list[bytes]) -> int | None:
    """Which configured token the request presents; every comparison is constant-time."""
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not tokens:
        return None
    candidate = presented.strip().encode("utf-8", "surrogateescape")
    found = None
    for index, token in enumerate(tokens):
        if hmac.compare_digest(candidate, token):
            found = index
    return found


def _error(status: int, code: str, message: str, headers: dict[str, str]) -> web.Response:
    """An error that needs headers, which an ApiError cannot carry; same JSON body."""
    return web.json_response(error_body(code, message), status=status, headers=headers)
