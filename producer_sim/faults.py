"""Faults injected into a fleet's run, and the truth about them. Pure: no I/O.

A ``FaultyRun`` turns a ``Fleet``'s readings into Kafka messages with faults whose
every effect is recorded in a ``Truth``, so the platform's answers can be checked:

- failing chargers: a share of meters runs at ``failing_efficiency`` from round
  ``fail_from`` on (default: the middle of the run); the vehicles charging there
  are faulty from then on;
- bad messages: extra messages, each a corrupted copy of a real reading, of a class
  whose consumer.decode.Reason is known (``BAD_CLASSES``); the real reading is still
  sent, so valid data stays complete;
- duplicates: an exact copy of a reading, sent again one to three rounds later;
- late readings: a reading held back and sent after the next ``late_rounds`` rounds;
- clock-skewed devices: a share of devices stamps every reading ``skew`` off the
  true time (keep it within the consumer's clock-skew limit); readings beyond that
  limit are the ``timestamp_in_future`` bad-message class;
- overheating batteries: a share of vehicles reports ``OVERHEAT_C`` and more for
  ``overheat_rounds`` rounds from a round of its own, then its true temperature again;
- silent devices: a share of devices (meters and vehicles) stops sending at a round of
  its own in the second half of the run, for good.

The truth also holds every charging session as the fleet lived it (a vehicle's run of
rounds with DC delivered), with its charger's true efficiency at the time.

Deterministic: the same fleet, run arguments, faults and ``now`` give the same
messages and the same truth.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple

from consumer.decode import Reason
from producer_sim.fleet import FAILING_EFFICIENCY, Fleet, Reading, encode

_LATE_ROUNDS_MAX = 1000
OVERHEAT_C = 60.0  # what an overheating pack reports, plus a little noise
_DUPLICATE_DELAY_ROUNDS = (1, 3)


class Message(NamedTuple):
    """One Kafka record: the device id as key, the value, and which kind of device sent it."""

    key: bytes
    value: bytes
    meter: bool


@dataclass(frozen=True, slots=True)
class Faults:
    """What to inject. Rates are shares of readings (or of devices, or of meters)."""

    failing_chargers: float = 0.0  # share of meters whose charger fails
    fail_from: int | None = None  # round index of the failure; None: rounds // 2
    failing_efficiency: float = FAILING_EFFICIENCY
    bad_messages: float = 0.0  # extra bad messages per reading
    duplicates: float = 0.0  # re-sent copies per reading
    late: float = 0.0  # share of readings held back
    late_rounds: int = 3
    skewed_devices: float = 0.0  # share of devices with a skewed clock
    skew: timedelta = timedelta(seconds=30)
    future_by: timedelta = timedelta(days=1)  # how far past "now" a future timestamp is
    overheating_batteries: float = 0.0  # share of vehicles
    overheat_rounds: int = 5
    silent_devices: float = 0.0  # share of devices

    def __post_init__(self) -> None:
        shares = ("failing_chargers", "bad_messages", "duplicates", "late", "skewed_devices")
        for name in (*shares, "overheating_batteries", "silent_devices"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:  # also rejects NaN
                raise ValueError(f"{name} must be a share between 0 and 1, not {value}")
        if not 0.0 < self.failing_efficiency <= 1.0:
            raise ValueError("failing_efficiency must be in (0, 1]")
        if not 1 <= self.late_rounds <= _LATE_ROUNDS_MAX:
            raise ValueError(f"late_rounds must be between 1 and {_LATE_ROUNDS_MAX}")
        if self.fail_from is not None and self.fail_from < 0:
            raise ValueError("fail_from must not be negative")
        if self.future_by <= timedelta(0):
            raise ValueError("future_by must be positive")
        if self.overheat_rounds < 1:
            raise ValueError("overheat_rounds must be at least 1")


@dataclass(slots=True)
class Truth:
    """What was injected: filled as the run's messages are produced, final at its end."""

    seed: int = 0
    start: str = ""
    interval_seconds: float = 0.0
    rounds: int = 0
    failing_efficiency: float = FAILING_EFFICIENCY
    failing_chargers: dict[str, str] = field(default_factory=dict)  # meter -> failed at
    faulty_vehicles: dict[str, str] = field(default_factory=dict)  # vehicle -> failed at
    skewed_devices: dict[str, float] = field(default_factory=dict)  # device -> seconds
    bad_messages: dict[str, int] = field(default_factory=dict)  # expected reason -> count
    duplicates: int = 0
    late_readings: int = 0
    readings: int = 0  # valid readings, each one (device, timestamp)
    messages: int = 0  # everything sent: readings, duplicates and bad messages
    overheated: dict[str, list[str]] = field(default_factory=dict)  # vehicle -> [from, to)
    silent: dict[str, str] = field(default_factory=dict)  # device -> its last reading
    # {vehicleId, meterId, startedAt, endedAt, kwhDeliveredDc, efficiency}, by end
    sessions: list[dict[str, str | float]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


# Each builder: (reading, encoded value, context) -> a bad value. Context carries `now`.
_Builder = Callable[[Reading, bytes, "_Context"], bytes]


@dataclass(frozen=True, slots=True)
class _Context:
    future: str  # an ISO timestamp beyond the consumer's clock-skew limit


def _id_field(reading: Reading) -> str:
    return "meterId" if "meterId" in reading else "vehicleId"


def _energy_field(reading: Reading) -> str:
    return "kwhConsumedAc" if "meterId" in reading else "kwhDeliveredDc"


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _with(reading: Reading, **changes: object) -> bytes:
    return _dumps({**reading, **changes})


def _without(reading: Reading, name: str) -> bytes:
    return _dumps({k: v for k, v in reading.items() if k != name})


def _renamed_id(reading: Reading) -> bytes:
    id_field = _id_field(reading)
    return _dumps({("deviceId" if k == id_field else k): v for k, v in reading.items()})


def _both_ids(reading: Reading) -> bytes:
    other = "vehicleId" if _id_field(reading) == "meterId" else "meterId"
    return _with(reading, **{other: str(reading[_id_field(reading)])})


def _invalid_utf8(reading: Reading, value: bytes) -> bytes:
    device = str(reading[_id_field(reading)]).encode()
    return value.replace(device, device + b"\xff", 1)


def _non_finite(reading: Reading) -> bytes:
    obj = {**reading, _energy_field(reading): float("nan")}
    return json.dumps(obj, separators=(",", ":"), allow_nan=True).encode()


# class name -> (builder, reason on the mixed topic, reason on a dedicated topic)
BAD_CLASSES: dict[str, tuple[_Builder, Reason, Reason]] = {
    "empty_payload": (lambda r, v, c: b"", Reason.EMPTY_PAYLOAD, Reason.EMPTY_PAYLOAD),
    "invalid_utf8": (lambda r, v, c: _invalid_utf8(r, v), Reason.INVALID_UTF8, Reason.INVALID_UTF8),
    "malformed_json": (lambda r, v, c: v[:-1], Reason.MALFORMED_JSON, Reason.MALFORMED_JSON),
    "duplicate_key": (
        lambda r, v, c: v[:-1] + b',"timestamp":' + _dumps(r["timestamp"]) + b"}",
        Reason.DUPLICATE_KEY,
        Reason.DUPLICATE_KEY,
    ),
    "not_an_object": (lambda r, v, c: b"[" + v + b"]", Reason.NOT_AN_OBJECT, Reason.NOT_AN_OBJECT),
    # On a dedicated topic the stream is known, so a missing id is a missing field.
    "unknown_shape": (lambda r, v, c: _renamed_id(r), Reason.UNKNOWN_SHAPE, Reason.MISSING_FIELD),
    "ambiguous_shape": (
        lambda r, v, c: _both_ids(r),
        Reason.AMBIGUOUS_SHAPE,
        Reason.AMBIGUOUS_SHAPE,
    ),
    "missing_field": (
        lambda r, v, c: _without(r, _energy_field(r)),
        Reason.MISSING_FIELD,
        Reason.MISSING_FIELD,
    ),
    "unknown_field": (
        lambda r, v, c: _with(r, firmware="4.2.1"),
        Reason.UNKNOWN_FIELD,
        Reason.UNKNOWN_FIELD,
    ),
    "wrong_type": (
        lambda r, v, c: _with(r, **{_energy_field(r): str(r[_energy_field(r)])}),
        Reason.WRONG_TYPE,
        Reason.WRONG_TYPE,
    ),
    "non_finite_number": (
        lambda r, v, c: _non_finite(r),
        Reason.NON_FINITE_NUMBER,
        Reason.NON_FINITE_NUMBER,
    ),
    "out_of_range": (
        lambda r, v, c: _with(r, **{_energy_field(r): -1.0}),
        Reason.OUT_OF_RANGE,
        Reason.OUT_OF_RANGE,
    ),
    "invalid_device_id": (
        lambda r, v, c: _with(r, **{_id_field(r): f"{r[_id_field(r)]}\u0007"}),
        Reason.INVALID_DEVICE_ID,
        Reason.INVALID_DEVICE_ID,
    ),
    "invalid_timestamp": (
        lambda r, v, c: _with(r, timestamp="yesterday at noon"),
        Reason.INVALID_TIMESTAMP,
        Reason.INVALID_TIMESTAMP,
    ),
    "timestamp_without_offset": (
        lambda r, v, c: _with(r, timestamp=str(r["timestamp"])[:19]),
        Reason.TIMESTAMP_WITHOUT_OFFSET,
        Reason.TIMESTAMP_WITHOUT_OFFSET,
    ),
    "timestamp_in_future": (
        lambda r, v, c: _with(r, timestamp=c.future),
        Reason.TIMESTAMP_IN_FUTURE,
        Reason.TIMESTAMP_IN_FUTURE,
    ),
}


def bad_message(name: str, reading: Reading, *, now: datetime, future_by: timedelta) -> bytes:
    """The bad-message class ``name`` made from one valid reading."""
    builder = BAD_CLASSES[name][0]
    return builder(reading, encode(reading)[1], _Context((now + future_by).isoformat()))


class FaultyRun:
    """A fleet's run as Kafka messages with faults injected; ``truth`` records them.

    ``now`` anchors future timestamps (``now + future_by``); ``mixed`` says whether
    the messages go to the mixed topic, which decides some expected reasons.
    """

    def __init__(
        self,
        fleet: Fleet,
        start: datetime,
        interval: timedelta,
        rounds: int,
        faults: Faults,
        *,
        now: datetime,
        mixed: bool = True,
        truth: Truth | None = None,
    ) -> None:
        if now.utcoffset() is None:
            raise ValueError("now must be timezone-aware")
        self.fleet, self.start, self.interval, self.rounds = fleet, start, interval, rounds
        self.faults, self.now, self.mixed = faults, now, mixed
        self.truth = truth if truth is not None else Truth()
        self.round = 0  # the round whose readings are being produced
        rng = random.Random(f"{fleet.seed}:faults")  # noqa: S311 -- a reproducible simulation

        meters = fleet.meter_ids
        fail_from = rounds // 2 if faults.fail_from is None else faults.fail_from
        failing = sorted(rng.sample(meters, round(faults.failing_chargers * len(meters))))
        self.failing = dict.fromkeys(failing, fail_from)
        failed_at = (start + fail_from * interval).isoformat()
        devices = [*meters, *fleet.vehicle_ids]
        skewed = sorted(rng.sample(devices, round(faults.skewed_devices * len(devices))))
        self.skewed = frozenset(skewed)

        truth = self.truth
        truth.seed, truth.start, truth.rounds = fleet.seed, start.isoformat(), rounds
        truth.interval_seconds = interval.total_seconds()
        truth.failing_efficiency = faults.failing_efficiency
        truth.failing_chargers = dict.fromkeys(failing, failed_at)
        failing_set = set(failing)
        truth.faulty_vehicles = {v: failed_at for v, m in fleet.charger.items() if m in failing_set}
        truth.skewed_devices = dict.fromkeys(skewed, faults.skew.total_seconds())

        vehicles = fleet.vehicle_ids
        hot = sorted(rng.sample(vehicles, round(faults.overheating_batteries * len(vehicles))))
        span = max(1, rounds - faults.overheat_rounds)
        self.overheat = {v: rng.randrange(span) for v in hot}  # first hot round
        for v, k in self.overheat.items():
            until = min(rounds, k + faults.overheat_rounds)
            truth.overheated[v] = [
                (start + k * interval).isoformat(),
                (start + until * interval).isoformat(),
            ]
        quiet = sorted(rng.sample(devices, round(faults.silent_devices * len(devices))))
        self.silent_from = {
            d: rng.randrange(rounds // 2, max(rounds // 2 + 1, rounds)) for d in quiet
        }
        for d, k in self.silent_from.items():
            if k > 0:
                truth.silent[d] = (start + (k - 1) * interval).isoformat()
        self._charging: dict[str, _Charge] = {}  # vehicle -> its session while charging
        self._charger, self._efficiency = fleet.charger, fleet.efficiency

    def __iter__(self) -> Iterator[Message]:
        return self._messages()

    def _messages(self) -> Iterator[Message]:
        faults, truth, fleet = self.faults, self.truth, self.fleet
        rng = random.Random(f"{fleet.seed}:faults:run")  # noqa: S311 -- as above
        context = _Context(
            (max(self.now, self.start + self.rounds * self.interval) + faults.future_by).isoformat()
        )
        names = sorted(BAD_CLASSES)
        bad = truth.bad_messages
        pending: dict[int, list[Message]] = defaultdict(list)  # round due -> messages
        per_round = len(fleet.meter_ids) + len(fleet.vehicle_ids)
        readings = fleet.readings(
            self.start,
            self.interval,
            self.rounds,
            failing=self.failing,
            failing_efficiency=faults.failing_efficiency,
        )
        for i, original in enumerate(readings):
            k, first = divmod(i, per_round)
            if first == 0:
                self.round = k
                for message in pending.pop(k, ()):
                    truth.messages += 1
                    yield message
            meter = "meterId" in original
            device = str(original["meterId"] if meter else original["vehicleId"])
            if not meter:
                self._track_session(device, original, k)
            as_sent = self._as_sent(device, original, k)
            if as_sent is None:
                continue  # this device has gone quiet
            reading = as_sent
            key, value = encode(reading)
            message = Message(key, value, meter)
            truth.readings += 1
            if faults.late and rng.random() < faults.late:
                truth.late_readings += 1
                pending[k + faults.late_rounds + 1].append(message)  # after the next N rounds
            else:
                truth.messages += 1
                yield message
            if faults.duplicates and rng.random() < faults.duplicates:
                truth.duplicates += 1
                pending[k + rng.randint(*_DUPLICATE_DELAY_ROUNDS)].append(message)
            if faults.bad_messages and rng.random() < faults.bad_messages:
                name = rng.choice(names)
                builder, on_mixed, on_dedicated = BAD_CLASSES[name]
                reason = (on_mixed if self.mixed else on_dedicated).value
                bad[reason] = bad.get(reason, 0) + 1
                truth.messages += 1
                yield Message(key, builder(reading, value, context), meter)
        for k in sorted(pending):  # held past the last round: sent at the end
            for message in pending.pop(k):
                truth.messages += 1
                yield message
        for vehicle in sorted(self._charging):
            self._end_session(vehicle)

    def _as_sent(self, device: str, reading: Reading, k: int) -> Reading | None:
        """The reading as the device sends it in round k: silent, overheating, skewed."""
        if k >= self.silent_from.get(device, self.rounds):
            return None
        hot_from = self.overheat.get(device)
        if hot_from is not None and hot_from <= k < hot_from + self.faults.overheat_rounds:
            reading = {**reading, "batteryTemp": OVERHEAT_C + (k - hot_from) * 0.5}
        if device in self.skewed:
            shifted = datetime.fromisoformat(str(reading["timestamp"])) + self.faults.skew
            reading = {**reading, "timestamp": shifted.isoformat()}
        return reading

    def _track_session(self, vehicle: str, reading: Reading, k: int) -> None:
        """Sessions as the fleet lived them: a run of rounds that delivered DC energy."""
        charge = self._charging.get(vehicle)
        if float(reading["kwhDeliveredDc"]) > 0:
            if charge is None:
                charge = self._charging[vehicle] = _Charge(str(reading["timestamp"]), k)
            charge.ended = str(reading["timestamp"])
            charge.dc += float(reading["kwhDeliveredDc"])
        elif charge is not None:
            self._end_session(vehicle)

    def _end_session(self, vehicle: str) -> None:
        charge = self._charging.pop(vehicle)
        meter = self._charger[vehicle]
        fails_at = self.failing.get(meter)
        failed = fails_at is not None and charge.first_round >= fails_at
        self.truth.sessions.append(
            {
                "vehicleId": vehicle,
                "meterId": meter,
                "startedAt": charge.started,
                "endedAt": charge.ended,
                "kwhDeliveredDc": round(charge.dc, 3),
                "efficiency": self.faults.failing_efficiency if failed else self._efficiency[meter],
            }
        )


@dataclass(slots=True)
class _Charge:
    """A session of the truth while it lasts."""

    started: str
    first_round: int
    ended: str = ""
    dc: float = 0.0
