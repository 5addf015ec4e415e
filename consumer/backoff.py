"""The one retry policy: capped exponential backoff with full jitter.

Each wait is drawn uniformly from [0, ceiling]; the ceiling starts at `initial` and
doubles up to `maximum`. Full jitter spreads the retries of many members (all waiting
for the same database or broker) instead of having them knock at once. Used by start-up
(dependencies coming up) and by the write path (the database going away).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    initial: float
    maximum: float
    _ceiling: float = field(init=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError("backoff needs 0 < initial <= maximum")
        self._ceiling = self.initial

    @property
    def ceiling(self) -> float:
        """The longest the next wait may be."""
        return self._ceiling

    def next_wait(self) -> float:
        wait = random.uniform(0, self._ceiling)  # noqa: S311 -- jitter, not a secret
        self._ceiling = min(self._ceiling * 2, self.maximum)
        return wait
