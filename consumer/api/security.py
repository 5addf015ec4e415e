"""Request metrics, request hygiene, rate limiting and bearer authentication, as middlewares.

make_app puts json_errors outermost; these go inside it, in this order:

    request_metrics        every request's duration by route template, method and status
    hygiene                one reading of a request: no Content-Encoding (415), one
                           Authorization header, each /v1 query parameter once (400;
                           REPEATABLE names the filters a route takes several times)
    rate_limit(settings)   a token bucket per client, charged by cost; 429 with Retry-After
    bearer_auth(settings)  a configured token with the route's scope, compared in constant
                           time (401, 403); without tokens /v1 is refused unless
                           FLEET_API_AUTH=off (503 auth_not_configured)

Metrics see every outcome, 401 and 429 included, and a client that went away as 499.
Rate limiting runs before authentication, so a client guessing tokens is throttled by
its address. Health, readiness, metrics and the OpenAPI document are open and never
throttled: probes and scrapes must not depend on credentials or load. The console's
static files are open too (they hold no data; the page asks /v1 with the operator's token).

Cost: a request costs 1 unit when it arrives; a handler that learns what it will cost
charges the rest with charge(): an ingested reading costs 1/100, a report a unit per
day of its window. One token's hundred month-long reports are throttled like the three
thousand small requests they weigh.
"""

from __future__ import annotations

import enum
import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware

from consumer.api.app import failure_status
from consumer.api.errors import ApiError
from consumer.errors import ConfigError
from consumer.metrics import HTTP_REQUEST_SECONDS
from consumer.settings import Settings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})
# The console's static files hold no data (it asks /v1 with the operator's token).
CONSOLE_PATHS = ("/", "/console")


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path in CONSOLE_PATHS or path.startswith("/console/")


MAX_CLIENTS = 10_000
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_CHARGE = web.RequestKey[Callable[[float], None]]("charge")
_CLIENT = web.RequestKey[str]("client")
# Query parameters a route takes more than once (filters); every other one appears once.
REPEATABLE: dict[str, frozenset[str]] = {"/v1/stream": frozenset({"vehicleId", "meterId"})}


class Scope(enum.StrEnum):
    READ = "read"  # GET /v1/...
    INGEST = "ingest"  # POST /v1/ingestion/...
    ADMIN = "admin"  # every other write: meter assignments, alert acknowledgements


@dataclass(frozen=True)
class Token:
    secret: bytes
    scopes: frozenset[Scope]


def security_middlewares(settings: Settings) -> list[Middleware]:
    """The middlewares in their intended order, for make_app(middlewares=...)."""
    return [request_metrics, hygiene, rate_limit(settings), bearer_auth(settings)]


@web.middleware
async def request_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Observe fleet_http_request_duration_seconds{route, method, status}."""
    started = time.perf_counter()
    try:
        response = await handler(request)
    except (ApiError, web.HTTPException) as exc:
        _observe(request, exc.status, started)
        raise
    except BaseException as exc:  # a client gone away cancels the handler: 499
        _observe(request, failure_status(request, exc), started)
        raise
    _observe(request, response.status, started)
    return response


def _observe(request: web.Request, status: int, started: float) -> None:
    resource = request.match_info.route.resource
    route = "unmatched" if resource is None else resource.canonical  # never the raw path
    method = request.method if request.method in _METHODS else "OTHER"
    HTTP_REQUEST_SECONDS.labels(route, method, str(status)).observe(time.perf_counter() - started)


@web.middleware
async def hygiene(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse what could be read two ways, or at a cost nobody asked for, before any work."""
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(
            415,
            "unsupported_content_encoding",
            "request bodies are not accepted compressed (Content-Encoding)",
        )
    if len(request.headers.getall(hdrs.AUTHORIZATION, [])) > 1:
        raise ApiError(400, "duplicate_header", "send one Authorization header")
    if request.path.startswith("/v1/"):
        repeatable = REPEATABLE.get(request.path, ())
        repeated = sorted(
            {k for k in request.query if len(request.query.getall(k)) > 1 and k not in repeatable}
        )
        if repeated:
            raise ApiError(
                400,
                "repeated_parameter",
                f"query parameters may appear once: {', '.join(repeated)}",
            )
    return await handler(request)


def client_of(request: web.Request) -> str:
    """Who is asking, as the rate limiter counts clients: a token's position, else the address."""
    client: str = request.get(_CLIENT, f"peer:{request.remote}")
    return client


def charge(request: web.Request, units: float) -> None:
    """Charge the client's bucket for what this request turned out to cost (429 if it
    cannot pay); a no-op on routes the rate limiter does not cover."""
    pay = request.get(_CHARGE)
    if pay is not None and units > 0:
        pay(units)


def rate_limit(settings: Settings) -> Middleware:
    """429 with Retry-After once a client has used up its bucket.

    A client is its bearer token when that token is valid (by position, so the
    secret is not kept as a key), else its peer address.
    """
    tokens = configured_tokens(settings)
    buckets = TokenBuckets(settings.rate_limit_per_second, settings.rate_limit_burst)

    @web.middleware
    async def limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_open(request.path):
            return await handler(request)
        index = _token_index(request, tokens)
        client = f"token:{index}" if index is not None else f"peer:{request.remote}"

        def pay(units: float) -> None:
            wait = buckets.take(client, time.monotonic(), units)
            if wait > 0:
                seconds = max(1, math.ceil(wait))
                raise ApiError(
                    429,
                    "rate_limited",
                    f"too many requests; retry in {seconds} s",
                    {"Retry-After": str(seconds)},
                )

        pay(1.0)
        request[_CHARGE] = pay
        request[_CLIENT] = client
        return await handler(request)

    return limit


def bearer_auth(settings: Settings) -> Middleware:
    """401 without a valid token, 403 without the route's scope; see the module docstring."""
    tokens = configured_tokens(settings)
    refuse_all = not tokens and settings.api_auth != "off"

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_open(request.path):
            return await handler(request)
        if refuse_all:
            raise ApiError(
                503,
                "auth_not_configured",
                "the API has no tokens configured (FLEET_API_TOKENS); it serves /v1 only "
                "with tokens, or with FLEET_API_AUTH=off",
            )
        if not tokens:  # FLEET_API_AUTH=off, on purpose
            return await handler(request)
        index = _token_index(request, tokens)
        if index is None:
            raise ApiError(
                401,
                "unauthorized",
                "a valid bearer token is required",
                {"WWW-Authenticate": "Bearer"},
            )
        needed = required_scope(request)
        if needed not in tokens[index].scopes:
            raise ApiError(
                403,
                "insufficient_scope",
                f"this token lacks the {needed} scope",
                {"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{needed}"'},
            )
        return await handler(request)

    return auth


def required_scope(request: web.Request) -> Scope:
    return scope_of(request.method, request.path)


def scope_of(method: str, path: str) -> Scope:
    """The scope a route needs (the OpenAPI document quotes the same rule)."""
    if path.startswith("/v1/ingestion/"):
        return Scope.INGEST
    if method in ("GET", "HEAD", "OPTIONS"):
        return Scope.READ
    return Scope.ADMIN


class TokenBuckets:
    """A token bucket per client, in an LRU of at most max_clients: the idlest go first."""

    def __init__(self, rate: float, burst: int, max_clients: int = MAX_CLIENTS) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, updated

    def take(self, client: str, now: float, cost: float = 1.0) -> float:
        """0 when the request may go ahead (cost taken), else seconds until it may.

        A cost above the burst is taken once the bucket is full, leaving it in debt: the
        client waits the debt off, so an expensive request is never refused for ever.
        """
        tokens, updated = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - updated) * self.rate)
        wait = 0.0
        needed = min(cost, self.burst)
        if tokens >= needed:
            tokens -= cost
        else:
            wait = (needed - tokens) / self.rate
        self._buckets[client] = (tokens, now)  # re-inserted: now the most recently used
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)


def configured_tokens(settings: Settings) -> list[Token]:
    """The bearer tokens of FLEET_API_TOKENS with their scopes; empty when none is set."""
    if settings.api_tokens is None:
        return []
    tokens = []
    for entry in settings.api_tokens.get_secret_value().split(","):
        secret, _, scopes = entry.strip().partition(":")
        if not secret:
            continue
        try:
            granted = frozenset(Scope(s.strip()) for s in scopes.split("+")) if scopes else None
        except ValueError:
            raise ConfigError(
                f"FLEET_API_TOKENS: a token's scopes must be among {', '.join(Scope)}, joined by +"
            ) from None
        tokens.append(Token(secret.encode(), granted or frozenset(Scope)))
    if not tokens:
        raise ConfigError("FLEET_API_TOKENS is set but holds no token")
    return tokens


def _token_index(request: web.Request, tokens: list[Token]) -> int | None:
    """Which configured token the request presents; every comparison is constant-time."""
    scheme, _, presented = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    if scheme.lower() != "bearer" or not tokens:
        return None
    candidate = presented.strip().encode("utf-8", "surrogateescape")
    found = None
    for index, token in enumerate(tokens):
        if hmac.compare_digest(candidate, token.secret):
            found = index
    return found
