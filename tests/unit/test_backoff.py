"""The one retry policy: full jitter under a ceiling that doubles up to a maximum."""

from __future__ import annotations

import pytest

from consumer.backoff import Backoff


def test_waits_stay_under_a_ceiling_that_doubles_up_to_the_maximum() -> None:
    backoff = Backoff(0.5, 3.0)
    ceilings = []
    for _ in range(6):
        ceiling = backoff.ceiling
        assert 0 <= backoff.next_wait() <= ceiling
        ceilings.append(ceiling)
    assert ceilings == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


def test_waits_are_spread_not_all_at_the_ceiling() -> None:
    """Full jitter: many members waiting at once do not retry at once."""
    waits = {round(Backoff(1.0, 1.0).next_wait(), 3) for _ in range(50)}
    assert len(waits) > 10


@pytest.mark.parametrize(("initial", "maximum"), [(0, 1), (2, 1), (-1, 5)])
def test_a_policy_that_cannot_work_is_refused(initial: float, maximum: float) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(initial, maximum)
