"""aiohttp application: /healthz, /readyz, /metrics, and JSON errors for everything."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consumer.api.deps import DEPS, ApiDeps
from consumer.api.errors import ApiError, error_body
from consumer.errors import is_transient

log = structlog.get_logger(__name__)

ReadinessCheck = Callable[[], Awaitable[None]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CHECK_TIMEOUT_S = 2.0


def failure_status(exc: Exception) -> int:
    """What json_errors answers an unexpected exception with: 503 when the database is
    away (worth a retry), else 500. request_metrics labels the request the same way."""
    return 503 if is_transient(exc) else 500


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error is JSON with a stable code; never a stack trace."""
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(error_body(exc.code, exc.message), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        kept = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        return web.json_response(error_body(code, exc.reason), status=exc.status, headers=kept)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if failure_status(exc) == 503:  # restarting, unreachable, out of connections
            log.warning("request_database_unavailable", path=request.path, error=repr(exc))
            body = error_body("database_unavailable", "the database is unavailable; retry shortly")
            return web.json_response(body, status=503, headers={"Retry-After": "5"})
        log.exception("request_failed", path=request.path)
        return web.json_response(error_body("internal_error", "internal error"), status=500)


def make_app(
    checks: Mapping[str, ReadinessCheck],
    before_scrape: Callable[[], None] | None = None,
    *,
    deps: ApiDeps | None = None,
    routes: Sequence[web.AbstractRouteDef] = (),
    middlewares: Sequence[Middleware] = (),
) -> web.Application:
    """The operations endpoints, plus the API's routes and middlewares when given."""
    app = web.Application(middlewares=[json_errors, *middlewares])
    if deps is not None:
        app[DEPS] = deps
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
        if all(v == "ok" for v in results.values()):
            return web.json_response({"status": "ready", "checks": results})
        body = error_body("not_ready", "a dependency is unavailable") | {"checks": results}
        return web.json_response(body, status=503)

    async def prometheus(_: web.Request) -> web.Response:
        if before_scrape is not None:
            before_scrape()
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", prometheus)
    return app
