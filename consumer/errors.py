"""The service's errors, and which of them are worth retrying.

    FleetError
     ├── ConfigError            settings or schema are wrong; fix and restart
     └── Fenced                 another member owns a partition of the batch; drop it, re-claim

Bad input is not an exception: the decoder returns a Rejection, which is
dead-lettered and committed like any reading. PostgreSQL being unavailable is
not one either: is_transient() tells the driver's own errors that are worth a
retry (pause, keep polling, retry) from those that are not.
"""

from __future__ import annotations

import asyncpg


class FleetError(Exception):
    pass


class ConfigError(FleetError):
    pass


class Fenced(FleetError):
    def __init__(self, partitions: list[tuple[str, int]]) -> None:
        super().__init__(f"partitions owned by another member: {partitions}")
        self.partitions = partitions


# SQLSTATE classes that mean "the server, not the data": connection exceptions (08),
# insufficient resources (53), operator intervention such as shutdown or
# pg_terminate_backend (57), and serialization failures / deadlocks (40).
_RETRIABLE_SQLSTATE_CLASSES = ("08", "53", "57", "40")


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same write later can succeed."""
    if isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError):
        return True  # refused, reset, closed mid-query, pool closing
    if isinstance(exc, asyncpg.PostgresError):
        return str(exc.sqlstate or "")[:2] in _RETRIABLE_SQLSTATE_CLASSES
    return False
