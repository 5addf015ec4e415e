"""The OpenAPI 3.1 document of the whole sidecar API, served at GET /openapi.json.

Generated, not written: each Operation (consumer.api.operation) gives its route,
parameters, body and answers, and pydantic turns the models of consumer.api.contract
into JSON Schema. The thresholds it quotes come from the serving process's settings.
Errors share one body, {"error": {"code", "message"}}; each answer lists its codes.
401 appears when FLEET_API_TOKENS is set and 429 under load, on every /v1 route.

Why not aiohttp-pydantic (which also validates from annotations and emits OpenAPI): its
views read the body themselves, where ours must go through consumer.api.body (bounded in
bytes, time and depth; duplicate keys refused), and its errors are pydantic's error list,
where each field here answers with its own stable code. Pydantic's JSON Schema and a
100-line generator give the same single source without those two fights.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from importlib.metadata import version
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, models_json_schema

from consumer.api import analytics, ingestion, sessions, stream
from consumer.api.contract import (
    INVALID_BODY,
    EfficiencyStatus,
    Error,
    Health,
    NotReady,
    Ready,
    invalid_markers,
)
from consumer.api.deps import DEPS
from consumer.api.operation import Answer, Operation
from consumer.settings import Settings

Schema = dict[str, Any]
REF = "#/components/schemas/{model}"
OPERATIONS: list[Operation] = [
    *analytics.OPERATIONS,
    ingestion.OPERATION,
    *sessions.OPERATIONS,
    stream.STREAM_OPERATION,
]


def openapi_routes() -> list[web.RouteDef]:
    built: list[bytes] = []  # the app's settings are fixed: built on first request, then kept

    async def serve_openapi(request: web.Request) -> web.Response:
        if not built:
            built.append(json.dumps(build_openapi(request.app[DEPS].settings)).encode())
        return web.Response(body=built[0], content_type="application/json")

    return [web.get("/openapi.json", serve_openapi)]


class _NoTitles(GenerateJsonSchema):
    """Property titles only repeat the names."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def _ref(model: type[BaseModel]) -> Schema:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel], description: str, media_type: str = "application/json") -> Schema:
    return {"description": description, "content": {media_type: {"schema": _ref(model)}}}


def build_openapi(settings: Settings) -> Schema:
    schemas = _component_schemas(OPERATIONS, settings)
    paths: dict[str, Schema] = {}
    for operation in OPERATIONS:
        paths.setdefault(operation.path, {})[operation.method.lower()] = _operation(operation)
    paths.update(_OPERATIONS_ENDPOINTS)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Fleet telemetry sidecar",
            "version": version("fleet-telemetry"),
            "description": "Analytics, live readings, meter assignments and HTTP ingestion for an "
            "EV fleet and its smart meters. JSON with camelCase fields; every error is "
            '{"error": {"code", "message"}} with a stable code.',
        },
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "One of FLEET_API_TOKENS, with the route's scope (read: GET; "
                    "ingest: POST /v1/ingestion; admin: other writes). Not required only when "
                    "FLEET_API_AUTH=off.",
                }
            },
            "schemas": schemas,
            "responses": _COMMON_RESPONSES,
        },
    }


def _component_schemas(operations: Iterable[Operation], settings: Settings) -> Schema:
    """Bodies (as validated) and answers (as serialised), and the types they share."""
    wanted: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {
        (Error, "serialization"): None,
        (Health, "serialization"): None,
        (Ready, "serialization"): None,
        (NotReady, "serialization"): None,
    }
    for operation in operations:
        if operation.body is not None:
            wanted[(operation.body, "validation")] = None
        for answer in operation.answers.values():
            wanted[(answer.model, "serialization")] = None
        for params in (operation.path_params, operation.query):
            if params is not None:  # their enums and the like, for the parameters' $refs
                wanted[(params, "validation")] = None
    _, top = models_json_schema(list(wanted), ref_template=REF, schema_generator=_NoTitles)
    schemas: Schema = top["$defs"]
    for operation in operations:  # parameters are described in place, not as components
        for params in (operation.path_params, operation.query):
            if params is not None:
                schemas.pop(params.__name__, None)
    schemas[EfficiencyStatus.__name__]["description"] = _status_text(settings)
    skew = f"{settings.max_clock_skew_seconds:g} s"
    for reading in ("MeterReading", "VehicleReading"):
        schemas[reading]["properties"]["timestamp"]["description"] = (
            f"With an offset; at most {skew} ahead of the receiver's clock."
        )
    return schemas


def _status_text(s: Settings) -> str:
    low, high = s.efficiency_fault_below, s.efficiency_anomalous_above
    return (
        f"normal {low:g}-{high:g}; fault below {low:g}; anomalous above {high:g} (impossible: "
        f"bad data); insufficient_data when the meter measured under {s.efficiency_min_ac_kwh:g} "
        "kWh; unlinked when no meter is known."
    )


def _parameters(model: type[BaseModel] | None, where: str) -> list[Schema]:
    if model is None:
        return []
    schema = model.model_json_schema(ref_template=REF, schema_generator=_NoTitles)
    required = set(schema.get("required", ()))
    parameters = []
    for name, declared in schema["properties"].items():
        prop = dict(declared)
        description = prop.pop("description", None)
        examples = prop.pop("examples", None)
        prop.pop("default", None)
        # An optional parameter is absent, never null.
        if "anyOf" in prop:
            kept = [s for s in prop.pop("anyOf") if s != {"type": "null"}]
            prop = kept[0] | prop if len(kept) == 1 else prop | {"anyOf": kept}
        parameter: Schema = {"name": name, "in": where, "required": name in required}
        parameter["schema"] = prop
        if description:
            parameter["description"] = description
        if examples:
            parameter["example"] = examples[0]
        parameters.append(parameter)
    return parameters


def _operation(op: Operation) -> Schema:
    answers: dict[int, Answer] = dict(op.answers)
    refused = [
        f"{m.code}"
        for model in (op.path_params, op.query, op.body if op.validate_body else None)
        if model is not None
        for m in invalid_markers(model)
    ]
    if op.body is not None and op.validate_body:
        refused[:0] = ["malformed_json (not JSON, duplicate keys, nested too deeply)", INVALID_BODY]
        answers.setdefault(
            413, Answer("payload_too_large: the body exceeds FLEET_API_MAX_BODY_BYTES.")
        )
        answers.setdefault(
            415, Answer("unsupported_media_type: Content-Type must be application/json.")
        )
    refused += op.refusals
    if refused:
        _add(answers, 400, ", ".join(refused) + ".")
    _add(answers, 400, "repeated_parameter, duplicate_header (sent twice).")
    _add(answers, 403, f"insufficient_scope: the token lacks the {op.scope} scope.")
    _add(answers, 415, "unsupported_content_encoding: no body is taken compressed.")
    _add(answers, 503, "auth_not_configured: no tokens, and FLEET_API_AUTH is not off.")
    if op.body is not None:
        _add(answers, 408, "body_timeout: the body did not arrive in time.")
    responses: Schema = {
        str(status): _json(answer.model, answer.description, answer.media_type)
        for status, answer in sorted(answers.items())
    }
    responses["401"] = {"$ref": "#/components/responses/Unauthorized"}
    responses["429"] = {"$ref": "#/components/responses/RateLimited"}
    document: Schema = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "security": [{"bearerAuth": []}],
        "parameters": _parameters(op.path_params, "path") + _parameters(op.query, "query"),
        "responses": dict(sorted(responses.items())),
    }
    if op.body is not None:
        document["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(op.body)}},
        }
    return document


def _add(answers: dict[int, Answer], status: int, text: str) -> None:
    """Another reason for a status: appended to its description, or a new Error answer."""
    if status in answers:
        answer = answers[status]
        answers[status] = Answer(answer.description.rstrip(".") + "; " + text, answer.model)
    else:
        answers[status] = Answer(text)


_COMMON_RESPONSES: Schema = {
    "Unauthorized": {
        "description": "unauthorized: a missing or wrong bearer token.",
        "headers": {"WWW-Authenticate": {"required": True, "schema": {"const": "Bearer"}}},
        "content": {"application/json": {"schema": _ref(Error)}},
    },
    "RateLimited": {
        "description": "rate_limited: the client's token bucket cannot pay for the request "
        "(1 unit, plus 1 per day of a report's window, 1 per 100 readings ingested).",
        "headers": {
            "Retry-After": {
                "required": True,
                "description": "Whole seconds to wait.",
                "schema": {"type": "integer", "minimum": 1},
            }
        },
        "content": {"application/json": {"schema": _ref(Error)}},
    },
}


def _open(operation_id: str, summary: str, responses: Schema) -> Schema:
    return {
        "get": {
            "operationId": operation_id,
            "summary": summary,
            "security": [],
            "responses": responses,
        }
    }


# consumer.api.app serves these to anyone: liveness, readiness, metrics and this document.
_OPERATIONS_ENDPOINTS: dict[str, Schema] = {
    "/healthz": _open("healthz", "Alive", {"200": _json(Health, "The process serves requests.")}),
    "/readyz": _open(
        "readyz",
        "Database and broker reachable",
        {
            "200": _json(Ready, "Every dependency answered."),
            "503": _json(NotReady, "not_ready: the checks say which dependency failed."),
        },
    ),
    "/metrics": _open(
        "metrics",
        "Prometheus metrics",
        {
            "200": {
                "description": "The Prometheus text exposition format.",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    ),
    # The operator console (consumer.api.console): static files; its data comes from /v1.
    "/": _open("root", "Redirects to the console", {"302": {"description": "To /console/."}}),
    "/console": _open(
        "console", "Redirects to /console/", {"302": {"description": "To /console/."}}
    ),
    "/console/": _open(
        "consoleIndex",
        "The operator console",
        {
            "200": {
                "description": "Its page.",
                "content": {"text/html": {"schema": {"type": "string"}}},
            }
        },
    ),
    "/console/{asset}": _open(
        "consoleAsset",
        "One of the console's files (JavaScript modules, CSS)",
        {
            "200": {
                "description": "The file.",
                "content": {
                    "text/javascript": {"schema": {"type": "string"}},
                    "text/css": {"schema": {"type": "string"}},
                    "text/html": {"schema": {"type": "string"}},
                },
            },
            "404": _json(Error, "not_found: the console has no such file."),
        },
    )
    | {
        "parameters": [
            {
                "name": "asset",
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
                "example": "console.js",
            }
        ]
    },
    "/openapi.json": _open(
        "openapi",
        "This document",
        {
            "200": {
                "description": "The OpenAPI 3.1 document.",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        },
    ),
}
