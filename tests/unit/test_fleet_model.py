"""The simulated fleet: deterministic, valid on the wire, and physically sensible. No broker."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest

from consumer.models import MeterReading, VehicleReading
from producer_sim.fleet import EFFICIENCY_RANGE, Fleet, Reading, encode

START = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
QUARTER_HOUR = timedelta(minutes=15)


def run(fleet: Fleet, interval: timedelta = QUARTER_HOUR, rounds: int = 96) -> list[Reading]:
    return list(fleet.readings(START, interval, rounds))


@pytest.fixture(scope="module")
def day() -> tuple[Fleet, list[Reading]]:
    """A day of 15-minute rounds: long enough for every vehicle to charge and drive."""
    fleet = Fleet(meters=120, vehicles=120, seed=7)
    return fleet, run(fleet)


def test_the_same_seed_replays_the_same_readings() -> None:
    assert run(Fleet(20, 30, seed=3), rounds=20) == run(Fleet(20, 30, seed=3), rounds=20)
    fleet = Fleet(20, 30, seed=3)
    assert run(fleet, rounds=20) == run(fleet, rounds=20)  # a second run does not drift
    assert run(Fleet(20, 30, seed=4), rounds=20) != run(Fleet(20, 30, seed=3), rounds=20)


def test_each_round_has_one_reading_per_device_stamped_with_an_offset() -> None:
    fleet = Fleet(meters=3, vehicles=5, seed=1)
    readings = run(fleet, interval=timedelta(minutes=1), rounds=4)
    assert len(readings) == 4 * (3 + 5)
    for k in range(4):
        chunk = readings[k * 8 : (k + 1) * 8]
        ids = [r.get("meterId", r.get("vehicleId")) for r in chunk]
        assert ids == [*fleet.meter_ids, *fleet.vehicle_ids]
        assert {r["timestamp"] for r in chunk} == {f"2026-11-27T10:0{k}:00+00:00"}
    assert fleet.meter_ids[0] == "meter-00001"
    assert fleet.vehicle_ids[4] == "ev-00005"
    assert fleet.charger["ev-00005"] == "meter-00002"  # vehicle i -> meter i % meters


def test_every_reading_is_accepted_by_the_consumer_models(
    day: tuple[Fleet, list[Reading]],
) -> None:
    _, readings = day
    for reading in readings:
        key, value = encode(reading)
        message = json.loads(value)
        model = MeterReading if "meterId" in message else VehicleReading
        parsed = model.model_validate(message)
        assert parsed.device_id == key.decode()
        assert b" " not in value  # compact


def test_energy_deltas_are_never_negative_and_soc_stays_a_percentage(
    day: tuple[Fleet, list[Reading]],
) -> None:
    _, readings = day
    for reading in readings:
        if "meterId" in reading:
            assert float(reading["kwhConsumedAc"]) >= 0
            assert 220 <= float(reading["voltage"]) <= 240
        else:
            assert float(reading["kwhDeliveredDc"]) >= 0
            assert 0 <= float(reading["soc"]) <= 100


def test_vehicles_alternate_charging_and_driving(day: tuple[Fleet, list[Reading]]) -> None:
    fleet, readings = day
    history: dict[str, list[Reading]] = defaultdict(list)
    for reading in readings:
        if "vehicleId" in reading:
            history[str(reading["vehicleId"])].append(reading)
    both = 0
    for rows in history.values():
        charged = driven = False
        for before, after in itertools.pairwise(rows):
            rise = float(after["soc"]) - float(before["soc"])
            if float(after["kwhDeliveredDc"]) > 0:
                charged = True
                assert rise >= 0  # energy in, charge up
            else:
                assert rise <= 0  # no energy in, no charge gained
                driven = driven or rise < 0
        both += charged and driven
    assert both >= 0.9 * len(fleet.vehicle_ids)


def test_dc_over_ac_sits_just_below_the_charger_efficiency(
    day: tuple[Fleet, list[Reading]],
) -> None:
    """Over a day, DC into a vehicle / AC of its meter is healthy (0.85-0.95).

    Standby draw keeps the ratio a little below the charger's true efficiency, never
    above it; a vehicle that charged only a trickle can sink lower, so the band is
    asserted for vehicles that took at least 1 kWh.
    """
    fleet, readings = day
    dc: dict[str, float] = defaultdict(float)
    ac: dict[str, float] = defaultdict(float)
    for reading in readings:
        if "meterId" in reading:
            ac[str(reading["meterId"])] += float(reading["kwhConsumedAc"])
        else:
            dc[str(reading["vehicleId"])] += float(reading["kwhDeliveredDc"])
    efficiency = fleet.efficiency
    charged = [v for v in fleet.vehicle_ids if dc[v] > 0]
    assert len(charged) >= 0.9 * len(fleet.vehicle_ids)
    for vehicle in charged:
        meter = fleet.charger[vehicle]
        ratio = dc[vehicle] / ac[meter]
        assert ratio < efficiency[meter]
        if dc[vehicle] >= 1.0:
            assert 0.85 <= ratio <= 0.95
            assert ratio > efficiency[meter] - 0.03  # standby is small
    assert all(EFFICIENCY_RANGE[0] <= e <= EFFICIENCY_RANGE[1] for e in efficiency.values())


def test_a_meter_shared_by_vehicles_consumes_for_all_of_them() -> None:
    fleet = Fleet(meters=1, vehicles=3, seed=2)
    readings = run(fleet)
    total_dc = sum(float(r["kwhDeliveredDc"]) for r in readings if "vehicleId" in r)
    total_ac = sum(float(r["kwhConsumedAc"]) for r in readings if "meterId" in r)
    assert total_dc > 0
    assert 0.85 <= total_dc / total_ac < fleet.efficiency["meter-00001"]


def test_a_start_without_an_offset_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        Fleet(1, 1, seed=1).readings(datetime(2026, 11, 27), QUARTER_HOUR, 1)
