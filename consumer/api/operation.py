"""One API operation: its route, the models it takes and answers, and its handler.

An Operation is both what aiohttp serves and what the OpenAPI document says:
`route()` validates the path, query and body with the declared models before the
handler runs (so a handler only ever sees valid input), and consumer.api.openapi
describes the same declaration.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel

from consumer.api.body import read_json
from consumer.api.contract import ApiModel, Error, parse
from consumer.api.deps import DEPS
from consumer.api.security import REPEATABLE, Scope, scope_of


@dataclass(frozen=True)
class Answer:
    """One documented status: what it means, and its body's model (an Error unless given)."""

    description: str
    model: type[BaseModel] = Error
    media_type: str = "application/json"


@dataclass(frozen=True)
class Operation:
    """A handler is called as handler(request, path=..., query=..., body=...), each validated
    with the model declared here (the keywords without a model are not passed)."""

    method: Literal["GET", "PUT", "POST"]
    path: str
    operation_id: str
    summary: str
    handler: Callable[..., Awaitable[web.StreamResponse]]
    answers: Mapping[int, Answer]
    path_params: type[ApiModel] | None = None
    query: type[ApiModel] | None = None
    body: type[BaseModel] | None = None
    # False: the model only documents the body; the handler reads and checks it itself.
    validate_body: bool = True
    # 400 codes the handler raises beyond the models' own fields, with what they mean.
    refusals: tuple[str, ...] = field(default=())

    @property
    def scope(self) -> Scope:
        return scope_of(self.method, self.path)

    def route(self) -> web.RouteDef:
        async def handle(request: web.Request) -> web.StreamResponse:
            given: dict[str, Any] = {}
            if self.path_params is not None:
                given["path"] = parse(self.path_params, dict(request.match_info))
            if self.query is not None:
                repeatable = REPEATABLE.get(self.path, frozenset())
                query = {
                    k: request.query.getall(k) if k in repeatable else v
                    for k, v in request.query.items()
                }
                given["query"] = parse(self.query, query)
            if self.body is not None and self.validate_body:
                limit = request.app[DEPS].settings.api_max_body_bytes
                given["body"] = parse(self.body, await read_json(request, limit))
            return await self.handler(request, **given)

        return web.route(self.method, self.path, handle)


def routes_of(operations: list[Operation]) -> list[web.RouteDef]:
    return [operation.route() for operation in operations]
