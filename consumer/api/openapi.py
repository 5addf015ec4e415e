"""The OpenAPI 3.1 document of the whole sidecar API, served at GET /openapi.json.

It describes every route, the read side included, and every status each one can
answer. Errors share one body, {"error": {"code", "message"}}; each response
lists its codes. 401 appears when FLEET_API_TOKENS is set and 429 under load,
on every route but the open ones (health, readiness, metrics and this document).
"""

from __future__ import annotations

import json
from importlib.metadata import version
from typing import Any

from aiohttp import web

from consumer.models import DEVICE_ID_PATTERN, MAX_KWH

Schema = dict[str, Any]


def openapi_routes() -> list[web.RouteDef]:
    return [web.get("/openapi.json", serve_openapi)]


async def serve_openapi(_: web.Request) -> web.Response:
    return web.Response(text=_OPENAPI_JSON, content_type="application/json")


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> Schema:
    return _json(_ref("Error"), description)


def _object(properties: Schema, *, optional: tuple[str, ...] = ()) -> Schema:
    required = [name for name in properties if name not in optional]
    return {
        "type": "object",
        "required": required,
        "properties": properties,
        "additionalProperties": False,
    }


def _query(name: str, schema: Schema, description: str) -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


# consumer.models.DeviceId: visible characters of any script, inner spaces only.
DEVICE_ID: Schema = {
    "type": "string",
    "minLength": 1,
    "maxLength": 128,
    "pattern": DEVICE_ID_PATTERN,
}
DATE_TIME: Schema = {"type": "string", "format": "date-time"}
NULLABLE_DATE_TIME: Schema = {"type": ["string", "null"], "format": "date-time"}
KWH: Schema = {"type": "number", "minimum": 0, "maximum": MAX_KWH}
NULLABLE_NUMBER: Schema = {"type": ["number", "null"]}
STATUS: Schema = {
    "type": "string",
    "enum": ["normal", "fault", "anomalous", "insufficient_data", "unlinked"],
    "description": "normal 0.85-1.0; fault below 0.85; anomalous above 1.0 (impossible: bad data); "
    "insufficient_data when too little energy was measured; unlinked when no meter is known.",
}

_SECURED: list[Schema] = [{"bearerAuth": []}]
_OPEN: list[Schema] = []
_UNAUTHORIZED = {"$ref": "#/components/responses/Unauthorized"}
_RATE_LIMITED = {"$ref": "#/components/responses/RateLimited"}
_DB_UNAVAILABLE = _error(
    "not_ready: the database is not connected yet; database_unavailable: it stopped "
    "answering (restart, outage); retry after Retry-After seconds."
)


# The examples name one vehicle and its charger's meter throughout.
EXAMPLE_VEHICLE = "ev-0001"
EXAMPLE_METER = "meter-0001"


def _vehicle_id(description: str = "The vehicle's id.") -> Schema:
    return {
        "name": "vehicleId",
        "in": "path",
        "required": True,
        "schema": DEVICE_ID,
        "example": EXAMPLE_VEHICLE,
        "description": description,
    }


_METER_ID_PATH: Schema = {
    "name": "meterId",
    "in": "path",
    "required": True,
    "schema": DEVICE_ID,
    "example": EXAMPLE_METER,
    "description": "The meter's id.",
}
_FROM = _query("from", DATE_TIME, "Window start, ISO-8601 with offset (default: `to` minus 24 h).")
_TO = _query("to", DATE_TIME, "Window end, ISO-8601 with offset (default: now).")
_WINDOW_ERRORS = "invalid_from, invalid_to, invalid_window (from not before to), window_too_large"

SCHEMAS: dict[str, Schema] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": _object({"code": {"type": "string"}, "message": {"type": "string"}}),
        },
    },
    "NotReady": {
        "type": "object",
        "required": ["error", "checks"],
        "properties": {
            "error": _object({"code": {"type": "string"}, "message": {"type": "string"}}),
            "checks": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
    "MeterReading": _object(
        {
            "meterId": DEVICE_ID,
            "kwhConsumedAc": KWH | {"description": "AC energy since the meter's previous reading."},
            "voltage": {"type": "number", "minimum": 0, "maximum": 100_000},
            "timestamp": DATE_TIME | {"description": "With an offset; at most 5 min ahead."},
        }
    ),
    "VehicleReading": _object(
        {
            "vehicleId": DEVICE_ID,
            "soc": {"type": "number", "minimum": 0, "maximum": 100},
            "kwhDeliveredDc": KWH | {"description": "DC energy since the previous reading."},
            "batteryTemp": {"type": "number", "minimum": -50, "maximum": 150},
            "timestamp": DATE_TIME | {"description": "With an offset; at most 5 min ahead."},
        }
    ),
    "Reading": {"oneOf": [_ref("MeterReading"), _ref("VehicleReading")]},
    "IngestionRequest": {
        "description": "One reading, or an array of them (at most 1000 by default). Each item "
        "is validated on its own: invalid items are reported back by index, not produced.",
        "oneOf": [_ref("Reading"), {"type": "array", "items": _ref("Reading")}],
        "examples": [
            [
                {
                    "meterId": EXAMPLE_METER,
                    "kwhConsumedAc": 1.25,
                    "voltage": 229.8,
                    "timestamp": "2026-01-01T12:00:00Z",
                },
                {
                    "vehicleId": EXAMPLE_VEHICLE,
                    "soc": 61.5,
                    "kwhDeliveredDc": 1.12,
                    "batteryTemp": 27.0,
                    "timestamp": "2026-01-01T12:00:00Z",
                },
            ]
        ],
    },
    "RejectedItem": _object(
        {
            "index": {"type": "integer", "minimum": 0},
            "reason": {
                "type": "string",
                "description": "The consumer's reason, e.g. out_of_range.",
            },
            "detail": {"type": "string"},
        }
    ),
    "IngestionAccepted": _object(
        {
            "accepted": {"type": "integer", "minimum": 1},
            "rejected": {"type": "array", "items": _ref("RejectedItem")},
        }
    ),
    "IngestionError": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": _object({"code": {"type": "string"}, "message": {"type": "string"}}),
            "rejected": {"type": "array", "items": _ref("RejectedItem")},
        },
    },
    "Performance": _object(
        {
            "vehicleId": {"type": "string"},
            "from": DATE_TIME,
            "to": DATE_TIME,
            "meterIds": {"type": "array", "items": {"type": "string"}},
            "totalKwhDeliveredDc": {"type": "number"},
            "totalKwhConsumedAc": NULLABLE_NUMBER,
            "avgBatteryTemp": NULLABLE_NUMBER,
            "efficiencyRatio": NULLABLE_NUMBER,
            "status": STATUS,
            "vehicleReadings": {"type": "integer", "minimum": 0},
            "meterReadings": {"type": "integer", "minimum": 0},
        }
    ),
    "AssignmentRequest": _object({"meterId": DEVICE_ID, "from": DATE_TIME})
    | {"examples": [{"meterId": EXAMPLE_METER, "from": "2026-01-01T00:00:00Z"}]},
    "Assignment": _object(
        {
            "vehicleId": {"type": "string"},
            "meterId": {"type": "string"},
            "from": DATE_TIME,
            "to": {"type": "null"},
        }
    ),
    "Assignments": _object(
        {
            "vehicleId": {"type": "string"},
            "assignments": {
                "type": "array",
                "items": _object(
                    {"meterId": {"type": "string"}, "from": DATE_TIME, "to": NULLABLE_DATE_TIME}
                ),
            },
        }
    ),
    "VehicleLive": _object(
        {
            "vehicleId": {"type": "string"},
            "soc": {"type": "number"},
            "kwhDeliveredDc": {"type": "number"},
            "batteryTemp": {"type": "number"},
            "timestamp": DATE_TIME,
            "updatedAt": DATE_TIME,
        }
    ),
    "MeterLive": _object(
        {
            "meterId": {"type": "string"},
            "kwhConsumedAc": {"type": "number"},
            "voltage": {"type": "number"},
            "timestamp": DATE_TIME,
            "updatedAt": DATE_TIME,
        }
    ),
    "FleetEfficiency": _object(
        {
            "from": DATE_TIME,
            "to": DATE_TIME,
            "vehicles": {
                "type": "array",
                "items": _object(
                    {
                        "vehicleId": {"type": "string"},
                        "meterIds": {"type": "array", "items": {"type": "string"}},
                        "totalKwhDeliveredDc": {"type": "number"},
                        "totalKwhConsumedAc": NULLABLE_NUMBER,
                        "efficiencyRatio": NULLABLE_NUMBER,
                        "status": STATUS,
                    }
                ),
            },
            "nextCursor": {"type": ["string", "null"]},
        }
    ),
}

PATHS: dict[str, Schema] = {
    "/v1/ingestion/telemetry": {
        "post": {
            "operationId": "ingestTelemetry",
            "summary": "Validate readings like the consumer does and produce the valid ones to Kafka",
            "security": _SECURED,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("IngestionRequest")}},
            },
            "responses": {
                "202": _json(
                    _ref("IngestionAccepted"),
                    "The broker acknowledged every accepted reading; rejected ones are listed by index.",
                ),
                "400": _json(
                    _ref("IngestionError"),
                    "malformed_json (not JSON, not UTF-8, duplicate keys, NaN/Infinity), invalid_body "
                    "(neither an object nor an array), no_valid_readings (with the rejected list).",
                ),
                "401": _UNAUTHORIZED,
                "413": _error("payload_too_large (body over the byte limit), too_many_items."),
                "415": _error("unsupported_media_type: Content-Type must be application/json."),
                "429": _RATE_LIMITED,
                "503": _error("broker_unavailable: nothing was acknowledged in time; retry."),
            },
        }
    },
    "/v1/analytics/performance/{vehicleId}": {
        "get": {
            "operationId": "vehiclePerformance",
            "summary": "A vehicle's charging efficiency over a window (default: the last 24 h)",
            "security": _SECURED,
            "parameters": [
                _vehicle_id(),
                _FROM,
                _TO,
                _query(
                    "meterId", DEVICE_ID, "The charger's meter (default: the assignment table)."
                ),
            ],
            "responses": {
                "200": _json(_ref("Performance"), "The vehicle's energy, efficiency and status."),
                "400": _error(f"{_WINDOW_ERRORS}, invalid_meter_id, invalid_vehicle_id."),
                "401": _UNAUTHORIZED,
                "404": _error("vehicle_not_found: no readings of the vehicle in the window."),
                "429": _RATE_LIMITED,
                "503": _DB_UNAVAILABLE,
            },
        }
    },
    "/v1/analytics/fleet/efficiency": {
        "get": {
            "operationId": "fleetEfficiency",
            "summary": "Every vehicle's efficiency over a window, worst first, paginated",
            "security": _SECURED,
            "parameters": [
                _FROM,
                _TO,
                _query("status", STATUS, "Only vehicles with this status."),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "Page size."),
                _query("cursor", {"type": "string"}, "nextCursor of the previous page."),
            ],
            "responses": {
                "200": _json(_ref("FleetEfficiency"), "One page of vehicles, worst first."),
                "400": _error(f"{_WINDOW_ERRORS}, invalid_status, invalid_limit, invalid_cursor."),
                "401": _UNAUTHORIZED,
                "429": _RATE_LIMITED,
                "503": _error(
                    _DB_UNAVAILABLE["description"].rstrip(".")
                    + "; overloaded: FLEET_API_MAX_CONCURRENT_REPORTS reports are running "
                    "(Retry-After: 1); query_timeout: the report ran past "
                    "FLEET_API_STATEMENT_TIMEOUT_MS."
                ),
            },
        }
    },
    "/v1/vehicles/{vehicleId}/meter": {
        "put": {
            "operationId": "assignMeter",
            "summary": "Assign a meter to the vehicle from a time on (closing the previous one)",
            "security": _SECURED,
            "parameters": [_vehicle_id()],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("AssignmentRequest")}},
            },
            "responses": {
                "200": _json(_ref("Assignment"), "The same assignment already existed."),
                "201": _json(_ref("Assignment"), "The assignment was created."),
                "400": _error(
                    "malformed_json (not JSON, duplicate keys, nested too deeply), invalid_body, "
                    "invalid_meter_id, invalid_from, invalid_vehicle_id."
                ),
                "413": _error("payload_too_large: the body exceeds FLEET_API_MAX_BODY_BYTES."),
                "415": _error("unsupported_media_type: Content-Type must be application/json."),
                "401": _UNAUTHORIZED,
                "403": _error(
                    "read_only: the API's database role may not write (a read-only login or "
                    "a replica); nothing was changed."
                ),
                "409": _error("assignment_conflict: it contradicts a later assignment."),
                "429": _RATE_LIMITED,
                "503": _DB_UNAVAILABLE,
            },
        },
        "get": {
            "operationId": "vehicleMeters",
            "summary": "The vehicle's meter assignments, oldest first",
            "security": _SECURED,
            "parameters": [_vehicle_id()],
            "responses": {
                "200": _json(_ref("Assignments"), "The assignments (empty when none)."),
                "400": _error("invalid_vehicle_id."),
                "401": _UNAUTHORIZED,
                "429": _RATE_LIMITED,
                "503": _DB_UNAVAILABLE,
            },
        },
    },
    "/v1/vehicles/{vehicleId}/live": {
        "get": {
            "operationId": "vehicleLive",
            "summary": "The vehicle's newest reading",
            "security": _SECURED,
            "parameters": [_vehicle_id()],
            "responses": {
                "200": _json(_ref("VehicleLive"), "The newest reading and when it was stored."),
                "400": _error("invalid_vehicle_id."),
                "401": _UNAUTHORIZED,
                "404": _error("vehicle_not_found."),
                "429": _RATE_LIMITED,
                "503": _DB_UNAVAILABLE,
            },
        }
    },
    "/v1/meters/{meterId}/live": {
        "get": {
            "operationId": "meterLive",
            "summary": "The meter's newest reading",
            "security": _SECURED,
            "parameters": [_METER_ID_PATH],
            "responses": {
                "200": _json(_ref("MeterLive"), "The newest reading and when it was stored."),
                "400": _error("invalid_meter_id."),
                "401": _UNAUTHORIZED,
                "404": _error("meter_not_found."),
                "429": _RATE_LIMITED,
                "503": _DB_UNAVAILABLE,
            },
        }
    },
    "/healthz": {
        "get": {
            "operationId": "healthz",
            "summary": "Alive",
            "security": _OPEN,
            "responses": {
                "200": _json(_object({"status": {"const": "ok"}}), "The process serves requests."),
            },
        }
    },
    "/readyz": {
        "get": {
            "operationId": "readyz",
            "summary": "Database and broker reachable",
            "security": _OPEN,
            "responses": {
                "200": _json(
                    _object(
                        {
                            "status": {"const": "ready"},
                            "checks": {
                                "type": "object",
                                "additionalProperties": {"type": "string"},
                            },
                        }
                    ),
                    "Every dependency answered.",
                ),
                "503": _json(
                    _ref("NotReady"), "not_ready: the checks say which dependency failed."
                ),
            },
        }
    },
    "/metrics": {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics",
            "security": _OPEN,
            "responses": {
                "200": {
                    "description": "The Prometheus text exposition format.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    },
    "/openapi.json": {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "security": _OPEN,
            "responses": {"200": _json({"type": "object"}, "The OpenAPI 3.1 document.")},
        }
    },
}


def _with_common_answers(paths: dict[str, Schema]) -> dict[str, Schema]:
    """What every /v1 operation may also answer, from the middlewares in front of it."""

    def add(answers: Schema, status: str, text: str) -> None:
        if status in answers:
            answers[status] = answers[status] | {
                "description": answers[status]["description"].rstrip(".") + "; " + text
            }
        else:
            answers[status] = _error(text)

    for path, operations in paths.items():
        if not path.startswith("/v1/"):
            continue
        for method, operation in operations.items():
            answers = operation["responses"]
            scope = "ingest" if "ingestion" in path else "read" if method == "get" else "admin"
            add(answers, "400", "repeated_parameter, duplicate_header (sent twice).")
            add(answers, "403", f"insufficient_scope: the token lacks the {scope} scope.")
            add(answers, "415", "unsupported_content_encoding: no body is taken compressed.")
            add(answers, "503", "auth_not_configured: no tokens, and FLEET_API_AUTH is not off.")
            if "requestBody" in operation:
                add(answers, "408", "body_timeout: the body did not arrive in time.")
    return paths


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Fleet telemetry sidecar",
        "version": version("fleet-telemetry"),
        "description": "Analytics, live readings, meter assignments and HTTP ingestion for an "
        "EV fleet and its smart meters. JSON with camelCase fields; every error is "
        '{"error": {"code", "message"}} with a stable code.',
    },
    "security": _SECURED,
    "paths": _with_common_answers(PATHS),
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
        "schemas": SCHEMAS,
        "responses": {
            "Unauthorized": {
                "description": "unauthorized: a missing or wrong bearer token.",
                "headers": {"WWW-Authenticate": {"required": True, "schema": {"const": "Bearer"}}},
                "content": {"application/json": {"schema": _ref("Error")}},
            },
            "RateLimited": {
                "description": "rate_limited: the client's token bucket cannot pay for the "
                "request (1 unit, plus 1 per day of a report's window, 1 per 100 readings "
                "ingested).",
                "headers": {
                    "Retry-After": {
                        "required": True,
                        "description": "Whole seconds to wait.",
                        "schema": {"type": "integer", "minimum": 1},
                    }
                },
                "content": {"application/json": {"schema": _ref("Error")}},
            },
        },
    },
}

_OPENAPI_JSON = json.dumps(OPENAPI)  # the same bytes every time: serialised once
