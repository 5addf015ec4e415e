"""The alert rules as pure functions: hysteresis, walking a backfill in order, consecutive heat."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from consumer.alerts import Kind, charger_walk, overheat_changes
from consumer.settings import Settings

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SETTINGS = Settings()


def walk(ratios: list[str], walked_to: int | None = None, unresolved: set[Kind] | None = None):  # type: ignore[no-untyped-def]
    ends = [T0 + timedelta(hours=i) for i in range(len(ratios))]
    return charger_walk(
        "m-1",
        [f"s{i}" for i in range(len(ratios))],
        [Decimal(r) for r in ratios],
        ends,
        None if walked_to is None else ends[walked_to],
        unresolved or set(),
        SETTINGS,
    )


def test_a_backfill_opens_the_alert_at_the_session_that_tipped_the_average() -> None:
    """Closed in one cycle, the sessions are still walked one by one: the alert opens at the
    end of the first session whose last-3 average is below 0.85, not at the newest."""
    changes, health = walk(["0.90", "0.90", "0.70", "0.70", "0.70"])
    assert [(c.kind, c.opens, c.at) for c in changes] == [
        (Kind.CHARGER_EFFICIENCY_LOW, True, T0 + timedelta(hours=2))  # (0.90+0.90+0.70)/3
    ]
    assert changes[0].evidence["sessionIds"] == ["s0", "s1", "s2"]
    assert (health.average, health.status, health.sessions) == (Decimal("0.7000"), "fault", 3)


def test_hysteresis_resolves_only_past_the_margin() -> None:
    """0.86 is above the threshold but inside the margin: still open; 0.87 resolves."""
    open_low = {Kind.CHARGER_EFFICIENCY_LOW}
    assert walk(["0.86", "0.86", "0.86"], unresolved=open_low)[0] == []
    (resolved,) = walk(["0.87", "0.87", "0.87"], unresolved=open_low)[0]
    assert (resolved.kind, resolved.opens) == (Kind.CHARGER_EFFICIENCY_LOW, False)


def test_sessions_walked_before_are_not_walked_again_and_fewer_than_k_rate_nothing() -> None:
    assert walk(["0.70", "0.70", "0.70"], walked_to=2)[0] == []
    changes, health = walk(["0.70", "0.70"])
    assert changes == [] and (health.average, health.status) == (None, "insufficient_data")


def test_overreporting_meters_get_their_own_alert() -> None:
    (change,) = walk(["1.05", "1.05", "1.05"])[0]
    assert (change.kind, change.opens) == (Kind.METER_OVERREPORTING, True)


def test_overheat_needs_consecutive_hot_readings_and_resolves_below_the_lower_bound() -> None:
    temps = ["56", "40", "55", "57", "52", "49"]
    readings = [(T0 + timedelta(minutes=i), Decimal(t)) for i, t in enumerate(temps)]
    changes = overheat_changes("v-1", readings, False, SETTINGS)
    assert [(c.opens, c.at) for c in changes] == [
        (True, T0 + timedelta(minutes=3)),
        (False, T0 + timedelta(minutes=5)),
    ]
