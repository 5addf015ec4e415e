"""Every route of the HTTP API: what `run --role api` serves and the OpenAPI document describes."""

from __future__ import annotations

from aiohttp import web

from consumer.api.analytics import analytics_routes
from consumer.api.console import console_routes
from consumer.api.ingestion import ingestion_routes
from consumer.api.openapi import openapi_routes
from consumer.api.operation import routes_of
from consumer.api.sessions import OPERATIONS as SESSION_OPERATIONS
from consumer.api.stream import STREAM_OPERATION


def api_routes() -> list[web.RouteDef]:
    return [
        *analytics_routes(),
        *ingestion_routes(),
        *routes_of(SESSION_OPERATIONS),
        STREAM_OPERATION.route(),
        *openapi_routes(),
        *console_routes(),
    ]
