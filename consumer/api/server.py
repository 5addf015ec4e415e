"""The HTTP server under hostile clients: what aiohttp's defaults leave open, closed.

- Bodies are never inflated (no route takes a compressed body; a Content-Encoding is a
  415, see consumer.api.security) and never lingered over: after an early answer the
  connection is closed instead of read to the end.
- A connection idle between requests, or whose request head has not fully arrived (a
  client sending headers a byte at a time), is closed after FLEET_HTTP_IDLE_TIMEOUT_SECONDS;
  bodies are bounded in time by the one body reader (consumer.api.body).
- At most FLEET_HTTP_MAX_CONNECTIONS_PER_ADDRESS connections per client address.
- A client that goes away cancels its handler, and with it the database query it waits on.
- Malformed HTTP (an oversized line, conflicting lengths) is answered with the same JSON
  error as everything else, and logged as one structured line, never a traceback.
- Every request is logged through structlog (`http_request`), and the Server header
  names no version.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import hdrs, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_protocol import RequestHandler

from consumer.api.errors import error_body
from consumer.settings import Settings

log = structlog.get_logger(__name__)
SERVER_HEADER = "fleet-telemetry"


@dataclass(frozen=True)
class ConnectionLimits:
    idle_timeout: float
    per_address: int  # 0: no cap

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(settings.http_idle_timeout_seconds, settings.http_max_connections_per_address)


class AccessLog(AbstractAccessLogger):
    """One structured line per request (aiohttp's own access log is plain text)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        log.info(
            "http_request",
            method=request.method,
            path=request.rel_url.raw_path,
            status=response.status,
            duration_seconds=round(time, 4),
            remote=request.remote,
        )

    @property
    def enabled(self) -> bool:
        return True


class _JsonErrorHandler(RequestHandler):
    """aiohttp's protocol handler, answering what it cannot parse in JSON."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        log.warning(
            "http_request_malformed",
            status=status,
            error=message or (str(exc) if exc else None),
            remote=request.remote,
        )
        code = "bad_request" if status < 500 else "internal_error"
        text = "the request is not valid HTTP" if status < 500 else "internal error"
        response = web.json_response(error_body(code, text), status=status)
        response.headers[hdrs.SERVER] = SERVER_HEADER
        response.force_close()
        return response


class _GuardedServer(web.Server):
    """aiohttp's connection factory, with a cap on connections per client address."""

    def __init__(self, *args: Any, per_address: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._per_address = per_address
        self._open: Counter[str] = Counter()

    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        address = _address(transport)
        self._open[address] += 1
        if self._per_address and self._open[address] > self._per_address:
            log.warning("http_connection_refused", remote=address, open=self._open[address] - 1)
            transport.abort()

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        transport = handler.transport
        if transport is not None:
            address = _address(transport)
            self._open[address] -= 1
            if self._open[address] <= 0:
                del self._open[address]
        super().connection_lost(handler, exc)


def _address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if peer else "unknown"


class HardenedRunner(web.AppRunner):
    """web.AppRunner with the limits above; one per listening application."""

    def __init__(self, app: web.Application, limits: ConnectionLimits) -> None:
        self._limits = limits
        super().__init__(app, **self._server_kwargs(limits))

    @staticmethod
    def _server_kwargs(limits: ConnectionLimits) -> dict[str, Any]:
        return {
            "handler_cancellation": True,  # a client gone: its handler and query cancelled
            "access_log_class": AccessLog,
            "keepalive_timeout": limits.idle_timeout,  # also bounds an unfinished head
            "lingering_time": 0,  # close after an early answer, never read on
            "auto_decompress": False,  # never inflate a body
        }

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # the application, started and frozen
        kwargs = self._server_kwargs(self._limits)
        return _GuardedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=kwargs.pop("handler_cancellation"),
            loop=asyncio.get_running_loop(),
            per_address=self._limits.per_address,
            debug=False,
            **kwargs,
        )


async def no_server_version(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: aiohttp would announce its and Python's versions."""
    response.headers[hdrs.SERVER] = SERVER_HEADER
