"""The one way a route reads a request body: JSON, bounded in bytes, time and depth.

The body must say `Content-Type: application/json`; it is read up to a byte limit
(refused as soon as the Content-Length or the bytes read exceed it) within
FLEET_HTTP_BODY_TIMEOUT_SECONDS, then parsed by the consumer's own parser: the same
duplicate-key, NaN/Infinity and nesting rules as a message from Kafka, so a deeply
nested body is a 400, never a RecursionError.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from consumer.api.deps import DEPS
from consumer.api.errors import ApiError
from consumer.decode import Limits, Rejection, parse_json

_READ_CHUNK_BYTES = 64 * 1024


async def read_json(request: web.Request, limit: int) -> Any:
    """The body as one JSON value, or the ApiError saying why it is not one."""
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json")
    timeout = request.app[DEPS].settings.http_body_timeout_seconds
    try:
        async with asyncio.timeout(timeout):
            body = await _read(request, limit)
    except TimeoutError:
        raise ApiError(
            408, "body_timeout", f"the body did not arrive within {timeout:g} s"
        ) from None
    parsed = parse_json(body, Limits(max_payload_bytes=len(body)))
    if isinstance(parsed, Rejection):
        raise ApiError(400, "malformed_json", f"{parsed.reason}: {parsed.detail}")
    return parsed


async def _read(request: web.Request, limit: int) -> bytes:
    """The body, refused as soon as it is known to exceed the limit (header or bytes read)."""
    too_large = ApiError(413, "payload_too_large", f"the body exceeds {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(_READ_CHUNK_BYTES):
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)
