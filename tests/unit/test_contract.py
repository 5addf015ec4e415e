"""The API contract: one set of models validates requests, shapes answers and writes the document."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from consumer.api.analytics import OPERATIONS
from consumer.api.contract import (
    AssignmentRequest,
    FleetQuery,
    Performance,
    PerformanceQuery,
    VehiclePath,
    invalid_markers,
    parse,
)
from consumer.api.errors import ApiError
from consumer.api.openapi import build_openapi
from consumer.settings import Settings


def refusal(model: type, data: object) -> tuple[str, str]:
    with pytest.raises(ApiError) as caught:
        parse(model, data)
    assert caught.value.status == 400
    return caught.value.code, caught.value.message


@pytest.mark.parametrize(
    ("model", "data", "code"),
    [
        (VehiclePath, {"vehicleId": "a\u200bb"}, "invalid_vehicle_id"),
        (PerformanceQuery, {"meterId": " m-1"}, "invalid_meter_id"),
        (PerformanceQuery, {"from": "1700000000"}, "invalid_from"),
        (PerformanceQuery, {"to": "2026-01-01T00:00:00"}, "invalid_to"),  # no offset
        (FleetQuery, {"limit": "1e3"}, "invalid_limit"),
        (FleetQuery, {"limit": "1001"}, "invalid_limit"),
        (FleetQuery, {"limit": " 10"}, "invalid_limit"),
        (FleetQuery, {"status": "broken"}, "invalid_status"),
        (AssignmentRequest, {"from": "2026-01-01T00:00:00Z"}, "invalid_meter_id"),
        (AssignmentRequest, {"meterId": "m-1", "from": 5}, "invalid_from"),
        (AssignmentRequest, [], "invalid_body"),
    ],
)
def test_a_wrong_field_is_refused_with_its_own_code(model: type, data: object, code: str) -> None:
    assert refusal(model, data)[0] == code


def test_unknown_body_fields_are_named_and_query_extras_ignored() -> None:
    code, message = refusal(AssignmentRequest, {"meterId": "m-1", "from": "x", "zz": 1, "aa": 2})
    assert (code, message) == ("invalid_body", "unknown fields: aa, zz")
    assert parse(FleetQuery, {"utm_source": "mail", "limit": "5"}).limit == 5


def test_a_query_offset_whose_plus_arrived_as_a_space_is_restored() -> None:
    query = parse(PerformanceQuery, {"from": "2026-01-31T10:00:00 01:00"})
    assert query.from_ == datetime(2026, 1, 31, 9, tzinfo=UTC)


def test_answers_carry_utc_instants_json_numbers_and_nulls() -> None:
    local = timezone(timedelta(hours=2))
    body = Performance(
        vehicle_id="v-1",
        from_=datetime(2026, 1, 1, 2, tzinfo=local),
        to=datetime(2026, 1, 1, 3, tzinfo=UTC),
        meter_ids=[],
        total_kwh_delivered_dc=Decimal("18.000"),
        total_kwh_consumed_ac=None,
        avg_battery_temp=Decimal("22.51"),
        efficiency_ratio=None,
        status="unlinked",
        vehicle_readings=10,
        meter_readings=0,
    ).body()
    assert body["from"] == "2026-01-01T00:00:00+00:00"
    assert body["totalKwhDeliveredDc"] == 18.0
    assert body["avgBatteryTemp"] == 22.51
    assert body["totalKwhConsumedAc"] is None
    assert "vehicleId" in body and "vehicle_id" not in body


def test_the_document_quotes_the_serving_settings() -> None:
    settings = Settings(efficiency_fault_below=0.9, max_clock_skew_seconds=60)
    schemas = build_openapi(settings)["components"]["schemas"]
    assert "fault below 0.9;" in schemas["EfficiencyStatus"]["description"]
    assert (
        "at most 60 s ahead" in schemas["VehicleReading"]["properties"]["timestamp"]["description"]
    )


def test_every_code_a_model_can_refuse_with_is_in_the_document() -> None:
    paths = build_openapi(Settings())["paths"]
    for operation in OPERATIONS:
        documented = paths[operation.path][operation.method.lower()]["responses"]["400"]
        for model in (operation.path_params, operation.query, operation.body):
            for marker in invalid_markers(model) if model else ():
                assert marker.code in documented["description"], operation.operation_id
