"""A fleet of smart meters and electric vehicles, as readings on the wire. Pure: no I/O.

Deterministic: the same (meters, vehicles, seed) and the same run arguments give the
same readings, however often ``readings`` is called.

The model, per round of ``interval``:
- Vehicle i charges at the charger whose meter is ``i % meters``. While charging it
  takes DC energy = charger power x time, capped at the session's target SoC; SoC rises
  by DC / capacity and the battery warms toward a few degrees above ambient. When the
  target is reached it leaves: no DC energy, SoC falls by its average draw (driving and
  parking together) and the battery relaxes toward ambient. It plugs in again when the
  trip is over or its SoC drops below its threshold.
- A meter consumes AC = DC / efficiency for every vehicle charging on it (so a meter
  shared by several vehicles sums them), plus the charger's standby draw at all times.
  Voltage is nominal 230 V, sagging a little under load.

Energy fields are deltas read like a real meter's register: each device keeps a
cumulative register in exact kWh and reports how much its value rounded to 1 Wh moved.
Deltas are therefore >= 0 and sum to the register over any run, without rounding drift.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta

Reading = dict[str, str | float]

EFFICIENCY_RANGE = (0.88, 0.94)
CHARGER_AC_KW = (7.4, 11.0, 22.0)  # common AC wallbox ratings
STANDBY_KW = (0.005, 0.02)  # a charger's electronics draw 5-20 W whether in use or not
NOMINAL_VOLTAGE = 230.0
VOLTAGE_SAG_PER_KW = 0.15
CAPACITY_KWH = (40.0, 100.0)
AWAY_KW = (1.0, 3.0)  # average draw away from the charger, driving and parked together
AWAY_HOURS = (2.0, 12.0)
TARGET_SOC = (80.0, 95.0)
PLUG_IN_SOC = (20.0, 40.0)
AMBIENT_C = (5.0, 25.0)
WARMING_C_PER_KW = 0.5  # charging at 11 kW settles the pack about 5 degrees above ambient
THERMAL_TAU_HOURS = 1.0
CHARGING_AT_START = 0.35  # share of vehicles plugged in when the run begins
FAILING_EFFICIENCY = 0.70  # a charger with a hardware fault wastes about a third

# Compact and strict: a NaN would be a bug here, never something to send.
_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False, check_circular=False)


class Fleet:
    def __init__(self, meters: int, vehicles: int, seed: int) -> None:
        if meters < 1 or vehicles < 0:
            raise ValueError("a fleet needs at least one meter and no negative vehicle count")
        self.seed = seed
        rng = random.Random(seed)  # noqa: S311 -- a reproducible simulation, not secrets
        self.meter_ids = tuple(f"meter-{i + 1:05d}" for i in range(meters))
        self.vehicle_ids = tuple(f"ev-{i + 1:05d}" for i in range(vehicles))
        self._meter_of = [i % meters for i in range(vehicles)]

        # Chargers (one per meter): fixed for the fleet's life.
        self._efficiency = [rng.uniform(*EFFICIENCY_RANGE) for _ in range(meters)]
        self._charger_kw = [rng.choice(CHARGER_AC_KW) for _ in range(meters)]
        self._standby_kw = [rng.uniform(*STANDBY_KW) for _ in range(meters)]
        self._site_voltage = [NOMINAL_VOLTAGE + rng.uniform(-3.0, 3.0) for _ in range(meters)]

        # Vehicles: fixed traits, then the state the run starts from.
        self._capacity = [rng.uniform(*CAPACITY_KWH) for _ in range(vehicles)]
        self._away_kw = [rng.uniform(*AWAY_KW) for _ in range(vehicles)]
        self._plug_in_soc = [rng.uniform(*PLUG_IN_SOC) for _ in range(vehicles)]
        self._ambient = [rng.uniform(*AMBIENT_C) for _ in range(vehicles)]
        self._charging0 = [rng.random() < CHARGING_AT_START for _ in range(vehicles)]
        self._target0 = [rng.uniform(*TARGET_SOC) for _ in range(vehicles)]
        self._soc0 = [
            rng.uniform(15.0, target - 5.0) if charging else rng.uniform(45.0, 90.0)
            for charging, target in zip(self._charging0, self._target0, strict=True)
        ]
        self._away_left0 = [rng.uniform(0.0, AWAY_HOURS[1]) for _ in range(vehicles)]
        self._temp0 = [ambient + rng.uniform(0.0, 3.0) for ambient in self._ambient]

    @property
    def charger(self) -> dict[str, str]:
        """vehicle id -> the meter id of the charger it uses."""
        return {v: self.meter_ids[m] for v, m in zip(self.vehicle_ids, self._meter_of, strict=True)}

    @property
    def efficiency(self) -> dict[str, float]:
        """meter id -> the true AC-to-DC efficiency of its charger."""
        return dict(zip(self.meter_ids, self._efficiency, strict=True))

    def readings(
        self,
        start: datetime,
        interval: timedelta,
        rounds: int,
        *,
        failing: Mapping[str, int] | None = None,
        failing_efficiency: float = FAILING_EFFICIENCY,
    ) -> Iterator[Reading]:
        """Yield, round by round, one reading per meter then one per vehicle.

        Round k is stamped ``start + k * interval`` and carries the energy of the
        interval that ends there. ``failing`` maps a meter id to the round from which
        its charger runs at ``failing_efficiency``: the same AC power, less DC out.
        """
        if start.utcoffset() is None:
            raise ValueError("start must be timezone-aware")
        if interval <= timedelta(0) or rounds < 0:
            raise ValueError("interval must be positive and rounds not negative")
        if not 0.0 < failing_efficiency <= 1.0:
            raise ValueError("failing_efficiency must be in (0, 1]")
        index = {meter: m for m, meter in enumerate(self.meter_ids)}
        fail_at: dict[int, list[int]] = {}
        for meter, at in (failing or {}).items():
            if meter not in index:
                raise ValueError(f"unknown meter {meter!r}")
            fail_at.setdefault(max(0, at), []).append(index[meter])
        return self._run(start, interval, rounds, fail_at, failing_efficiency)

    def _at_efficiency(self, m: int, efficiency: float, hours: float) -> tuple[float, ...]:
        """Charger m's (efficiency, DC kWh per round, warming) when it runs at ``efficiency``."""
        kw = self._charger_kw[m]
        return efficiency, kw * efficiency * hours, WARMING_C_PER_KW * kw * efficiency

    def _run(
        self,
        start: datetime,
        interval: timedelta,
        rounds: int,
        fail_at: dict[int, list[int]],
        failing_efficiency: float,
    ) -> Iterator[Reading]:
        # A second generator, so the traits above do not depend on the run's length.
        rng = random.Random(f"{self.seed}:run")  # noqa: S311 -- as above
        hours = interval / timedelta(hours=1)
        relax = 1.0 - math.exp(-hours / THERMAL_TAU_HOURS)
        meters, vehicles = len(self.meter_ids), len(self.vehicle_ids)
        meter_ids, vehicle_ids, meter_of = self.meter_ids, self.vehicle_ids, self._meter_of
        efficiency = list(self._efficiency)  # a failing charger changes its own copy
        ambient, plug_in_soc = self._ambient, self._plug_in_soc
        site_voltage = self._site_voltage
        dc_per_round = [
            kw * eff * hours for kw, eff in zip(self._charger_kw, efficiency, strict=True)
        ]
        warm_to = [
            WARMING_C_PER_KW * kw * eff
            for kw, eff in zip(self._charger_kw, efficiency, strict=True)
        ]
        standby = [kw * hours for kw in self._standby_kw]
        kwh_per_pct = [c / 100.0 for c in self._capacity]
        away_pct = [
            kw * hours / c * 100.0 for kw, c in zip(self._away_kw, self._capacity, strict=True)
        ]

        # Mutable state, copied so every call replays the same run.
        soc, temp = list(self._soc0), list(self._temp0)
        charging, target, away_left = (
            list(self._charging0),
            list(self._target0),
            list(self._away_left0),
        )
        dc_register, dc_reported = [0.0] * vehicles, [0] * vehicles  # kWh exact, Wh reported
        ac_register, ac_reported = [0.0] * meters, [0] * meters

        for k in range(rounds):
            for m in fail_at.get(k, ()):
                efficiency[m], dc_per_round[m], warm_to[m] = self._at_efficiency(
                    m, failing_efficiency, hours
                )
            timestamp = (start + k * interval).isoformat()
            load = [0.0] * meters  # AC kWh drawn by charging vehicles this round
            out: list[Reading] = []
            for i in range(vehicles):
                m = meter_of[i]
                if charging[i]:
                    dc = min(dc_per_round[m], (target[i] - soc[i]) * kwh_per_pct[i])
                    soc[i] += dc / kwh_per_pct[i]
                    dc_register[i] += dc
                    load[m] += dc / efficiency[m]
                    temp[i] += (ambient[i] + warm_to[m] - temp[i]) * relax
                    if soc[i] >= target[i] - 1e-9:
                        charging[i] = False
                        away_left[i] = rng.uniform(*AWAY_HOURS)
                else:
                    soc[i] = max(0.0, soc[i] - away_pct[i])
                    temp[i] += (ambient[i] - temp[i]) * relax
                    away_left[i] -= hours
                    if away_left[i] <= 0.0 or soc[i] <= plug_in_soc[i]:
                        goal = rng.uniform(*TARGET_SOC)
                        if soc[i] < goal:
                            charging[i], target[i] = True, goal
                        else:  # still full enough: another trip
                            away_left[i] = rng.uniform(*AWAY_HOURS)
                wh = round(dc_register[i] * 1000.0)
                out.append(
                    {
                        "vehicleId": vehicle_ids[i],
                        "soc": round(soc[i], 2),
                        "kwhDeliveredDc": (wh - dc_reported[i]) / 1000.0,
                        "batteryTemp": round(temp[i], 2),
                        "timestamp": timestamp,
                    }
                )
                dc_reported[i] = wh

            for m in range(meters):
                ac_register[m] += load[m] + standby[m]
                wh = round(ac_register[m] * 1000.0)
                sag = VOLTAGE_SAG_PER_KW * load[m] / hours
                yield {
                    "meterId": meter_ids[m],
                    "kwhConsumedAc": (wh - ac_reported[m]) / 1000.0,
                    "voltage": round(site_voltage[m] - sag + rng.uniform(-1.0, 1.0), 2),
                    "timestamp": timestamp,
                }
                ac_reported[m] = wh
            yield from out


def encode(reading: Reading) -> tuple[bytes, bytes]:
    """(key, value) for Kafka: the device id, and the reading as compact UTF-8 JSON."""
    device = reading["meterId"] if "meterId" in reading else reading["vehicleId"]
    return str(device).encode(), _JSON.encode(reading).encode()
