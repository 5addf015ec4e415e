"""The simulated fleet: deterministic, valid on the wire, and physically sensible. No broker."""

from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta

import pytest

from consumer.decode import Limits, Rejection, decode
from consumer.models import MeterReading, Stream, VehicleReading
from producer_sim.__main__ import _faults, _parser
from producer_sim.faults import BAD_CLASSES, Faults, FaultyRun, Message, bad_message
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


# Faults and their truth.

NOW = START + timedelta(days=2)
FAULTS = Faults(
    failing_chargers=0.1,
    bad_messages=0.05,
    duplicates=0.02,
    late=0.02,
    skewed_devices=0.1,
    skew=timedelta(seconds=30),
)


def faulty_run(faults: Faults = FAULTS, *, mixed: bool = True) -> FaultyRun:
    return FaultyRun(
        Fleet(meters=40, vehicles=40, seed=11),
        START,
        timedelta(minutes=1),
        120,
        faults,
        now=NOW,
        mixed=mixed,
    )


def decoded(message: Message, *, mixed: bool = True) -> object:
    expected = None if mixed else (Stream.METER if message.meter else Stream.VEHICLE)
    return decode(message.value, expected, now=NOW, limits=Limits())


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "dedicated"])
@pytest.mark.parametrize("name", sorted(BAD_CLASSES))
def test_each_bad_message_class_is_rejected_for_its_expected_reason(
    name: str, *, mixed: bool
) -> None:
    """Every injectable bad message, made from a meter's or a vehicle's reading, gets its reason."""
    fleet = Fleet(meters=1, vehicles=1, seed=1)
    for reading in fleet.readings(START, QUARTER_HOUR, 1):
        value = bad_message(name, reading, now=NOW, future_by=timedelta(days=1))
        message = Message(b"k", value, "meterId" in reading)
        result = decoded(message, mixed=mixed)
        assert isinstance(result, Rejection), (name, value)
        assert result.reason is BAD_CLASSES[name][1 if mixed else 2], (name, result)


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "dedicated"])
def test_the_truth_counts_what_the_decoder_sees(*, mixed: bool) -> None:
    """Rejections by reason, valid readings, duplicates and the total all match the truth."""
    run = faulty_run(mixed=mixed)
    messages = list(run)
    truth = run.truth
    rejected: Counter[str] = Counter()
    valid: list[tuple[str, object]] = []
    for message in messages:
        result = decoded(message, mixed=mixed)
        if isinstance(result, Rejection):
            rejected[result.reason.value] += 1
        else:
            assert not isinstance(result, Rejection)
            valid.append((result.device_id, result.timestamp))
    assert dict(rejected) == truth.bad_messages
    assert len(truth.bad_messages) >= 10  # most classes show up in a run this size
    assert len(messages) == truth.messages
    assert len(set(valid)) == truth.readings == 120 * 80
    assert len(valid) - len(set(valid)) == truth.duplicates > 0
    assert truth.late_readings > 0


def test_a_faulty_run_replays_the_same_messages_and_truth() -> None:
    """The same fleet, run and faults give the same messages and the same truth."""
    first, second = faulty_run(), faulty_run()
    assert list(first) == list(second)
    assert first.truth == second.truth
    assert list(faulty_run()) != list(faulty_run(Faults(bad_messages=0.05)))


def test_without_faults_a_faulty_run_is_the_plain_run() -> None:
    """With every rate at zero the messages are exactly the plain readings and nothing is faulty."""
    run = faulty_run(Faults())
    plain = [encode(r) for r in run.fleet.readings(START, timedelta(minutes=1), 120)]
    assert [(m.key, m.value) for m in run] == plain
    assert run.truth.bad_messages == {}
    assert run.truth.failing_chargers == run.truth.faulty_vehicles == {}


def test_late_readings_arrive_after_newer_ones_of_their_device() -> None:
    """A held-back reading is sent after a newer reading of the same device."""
    run = faulty_run(Faults(late=0.02, late_rounds=3))
    newest: dict[bytes, datetime] = {}
    gaps: list[timedelta] = []
    for message in run:
        stamp = datetime.fromisoformat(json.loads(message.value)["timestamp"])
        if message.key in newest and stamp < newest[message.key]:
            gaps.append(newest[message.key] - stamp)
        newest[message.key] = max(stamp, newest.get(message.key, stamp))
    # Nearly all are overtaken by three newer rounds; the rest by a newer reading held too.
    assert len(gaps) <= run.truth.late_readings
    assert sum(gap >= timedelta(minutes=3) for gap in gaps) >= 0.9 * run.truth.late_readings > 0


def test_skewed_devices_are_off_by_the_skew_and_still_accepted() -> None:
    """A skewed device stamps every reading the skew off the round time, and is still accepted."""
    run = faulty_run(Faults(skewed_devices=0.25, skew=timedelta(seconds=90)))
    skewed = run.truth.skewed_devices
    assert len(skewed) == 20
    for message in run:
        reading = json.loads(message.value)
        device = reading.get("meterId", reading.get("vehicleId"))
        seconds = datetime.fromisoformat(reading["timestamp"]).second
        assert seconds == (30 if device in skewed else 0)
        assert not isinstance(decoded(message), Rejection)


def test_failing_chargers_make_their_vehicles_inefficient_from_the_failure_on() -> None:
    """After the failure, DC / AC of a faulty vehicle is far below 0.85; others stay healthy."""
    run = faulty_run(Faults(failing_chargers=0.1))
    fleet, truth = run.fleet, run.truth
    assert len(truth.failing_chargers) == 4
    assert set(truth.faulty_vehicles) == {
        v for v, m in fleet.charger.items() if m in truth.failing_chargers
    }
    failed_at = datetime.fromisoformat(next(iter(truth.failing_chargers.values())))
    assert failed_at == START + timedelta(minutes=60)
    dc: dict[str, float] = defaultdict(float)
    ac: dict[str, float] = defaultdict(float)
    for message in run:
        reading = json.loads(message.value)
        if datetime.fromisoformat(reading["timestamp"]) < failed_at:
            continue
        if "meterId" in reading:
            ac[reading["meterId"]] += reading["kwhConsumedAc"]
        else:
            dc[reading["vehicleId"]] += reading["kwhDeliveredDc"]
    rated = 0
    for vehicle, meter in fleet.charger.items():
        if ac[meter] < 1.0:
            continue  # not charged enough to rate
        ratio = dc[vehicle] / ac[meter]
        if vehicle in truth.faulty_vehicles:
            rated += 1
            assert ratio < 0.71
        else:
            assert 0.85 <= ratio <= 0.95
    assert rated > 0


def test_fault_rates_outside_zero_to_one_are_refused() -> None:
    """A rate that is not a share between 0 and 1 is refused."""
    with pytest.raises(ValueError, match="share between 0 and 1"):
        Faults(duplicates=1.5)
    with pytest.raises(ValueError, match="share between 0 and 1"):
        Faults(bad_messages=float("nan"))


def test_the_cli_takes_the_plain_path_unless_a_fault_or_the_truth_is_asked_for() -> None:
    """Without fault flags or --truth the CLI publishes the plain, fastest run."""
    parser = _parser()
    assert _faults(parser.parse_args([])) is None
    assert _faults(parser.parse_args(["--truth", "truth.json"])) == Faults()
    faults = _faults(parser.parse_args(["--duplicates", "0.01", "--skew-seconds", "45"]))
    assert faults == Faults(duplicates=0.01, skew=timedelta(seconds=45))
    with pytest.raises(SystemExit):
        parser.parse_args(["--late", "2"])
