"""aiohttp application: /healthz, /readyz, /metrics, and JSON errors for everything."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

import asyncpg
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consumer.api.deps import DEPS, ApiDeps
from consumer.api.errors import ApiError, error_body
from consumer.api.server import no_server_version
from consumer.errors import is_transient

log = structlog.get_logger(__name__)

ReadinessCheck = Callable[[], Awaitable[None]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CHECK_TIMEOUT_S = 2.0
_METRICS_TTL_S = 1.0  # scrapes within a second share one rendering
CLIENT_CLOSED = 499  # nginx's status for "the client went away first"; never sent


def client_went_away(request: web.Request, exc: BaseException) -> bool:
    """The client hung up: its handler was cancelled, or its body stopped mid-way."""
    transport = request.transport
    gone = transport is None or transport.is_closing()
    return gone and isinstance(exc, asyncio.CancelledError | ConnectionError)


def failure_status(request: web.Request, exc: BaseException) -> int:
    """What json_errors answers an unexpected exception with (request_metrics labels the
    request the same way): 499 when the client went away, 503 when the database is away
    or a query ran past FLEET_API_STATEMENT_TIMEOUT_MS (worth a retry), else 500."""
    if client_went_away(request, exc):
        return CLIENT_CLOSED
    if isinstance(exc, asyncpg.QueryCanceledError) or is_transient(exc):
        return 503
    return 500


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error is JSON with a stable code; never a stack trace."""
    try:
        return await handler(request)
    except ApiError as exc:
        body = error_body(exc.code, exc.message)
        return web.json_response(body, status=exc.status, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        kept = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        return web.json_response(error_body(code, exc.reason), status=exc.status, headers=kept)
    except asyncio.CancelledError:
        if client_went_away(request, asyncio.CancelledError()):
            log.info("request_aborted", path=request.path, reason="client closed")
        raise
    except Exception as exc:
        status = failure_status(request, exc)
        if status == CLIENT_CLOSED:
            log.info("request_aborted", path=request.path, reason=repr(exc))
            raise
        if isinstance(exc, asyncpg.QueryCanceledError):
            log.warning("request_query_timeout", path=request.path)
            body = error_body(
                "query_timeout", "the query took too long; narrow the window or retry later"
            )
            return web.json_response(body, status=503, headers={"Retry-After": "5"})
        if status == 503:  # restarting, unreachable, out of connections
            log.warning("request_database_unavailable", path=request.path, error=repr(exc))
            body = error_body("database_unavailable", "the database is unavailable; retry shortly")
            return web.json_response(body, status=503, headers={"Retry-After": "5"})
        log.exception("request_failed", path=request.path)
        return web.json_response(error_body("internal_error", "internal error"), status=500)


def metrics_handler(before_scrape: Callable[[], None] | None) -> Handler:
    """GET /metrics, rendered at most once a second however often it is scraped."""
    cached: list[tuple[float, bytes]] = []

    async def prometheus(_: web.Request) -> web.Response:
        now = time.monotonic()
        if not cached or now - cached[0][0] > _METRICS_TTL_S:
            if before_scrape is not None:
                before_scrape()
            cached[:] = [(now, generate_latest())]
        return web.Response(body=cached[0][1], headers={"Content-Type": CONTENT_TYPE_LATEST})

    return prometheus


def make_app(
    checks: Mapping[str, ReadinessCheck],
    before_scrape: Callable[[], None] | None = None,
    *,
    deps: ApiDeps | None = None,
    routes: Sequence[web.AbstractRouteDef] = (),
    middlewares: Sequence[Middleware] = (),
    serve_metrics: bool = True,
) -> web.Application:
    """The operations endpoints, plus the API's routes and middlewares when given."""
    app = web.Application(middlewares=[json_errors, *middlewares])
    app.on_response_prepare.append(no_server_version)
    if deps is not None:
        app[DEPS] = deps

        async def close_deps(_: web.Application) -> None:
            await deps.close()

        # on_shutdown: before aiohttp waits for open requests, so streams end rather than
        # outlive the database pool.
        app.on_shutdown.append(close_deps)
    app.router.add_routes(routes)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        results: dict[str, str] = {}
        for name, check in checks.items():
            try:
                await asyncio.wait_for(check(), _CHECK_TIMEOUT_S)
                results[name] = "ok"
            except Exception as exc:
                results[name] = f"unavailable: {type(exc).__name__}"
                if str(exc):
                    results[name] += f": {exc}"
        if all(v == "ok" for v in results.values()):
            return web.json_response({"status": "ready", "checks": results})
        body = error_body("not_ready", "a dependency is unavailable") | {"checks": results}
        return web.json_response(body, status=503)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if serve_metrics:
        app.router.add_get("/metrics", metrics_handler(before_scrape))
    return app


def make_metrics_app(before_scrape: Callable[[], None] | None = None) -> web.Application:
    """/metrics alone, for FLEET_METRICS_PORT: scrapes apart from API traffic."""
    app = web.Application(middlewares=[json_errors])
    app.on_response_prepare.append(no_server_version)
    app.router.add_get("/metrics", metrics_handler(before_scrape))
    return app
