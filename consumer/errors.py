"""The service's errors, and which of them are worth retrying.

    FleetError
     ├── ConfigError            settings or schema are wrong; fix and restart
     └── Fenced                 another member owns a partition of the batch; drop it, re-claim

Bad input is not an exception: the decoder returns a Rejection, which is
dead-lettered and committed like any reading. PostgreSQL being unavailable is
not one either: is_transient() tells the driver's own errors that are worth a
retry (pause, keep polling, retry) from those that are not, and
is_misconfiguration() picks out the connection failures that only a change of
settings can fix (TLS that does not verify or is not offered), which start-up
turns into a ConfigError instead of waiting for ever.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence

import asyncpg


class FleetError(Exception):
    pass


class ConfigError(FleetError):
    pass


class Fenced(FleetError):
    def __init__(self, partitions: Sequence[tuple[str, int]]) -> None:
        super().__init__(f"partitions owned by another member: {partitions}")
        self.partitions = partitions


# SQLSTATE classes that mean "the server, not the data": connection exceptions (08),
# insufficient resources (53), operator intervention such as shutdown or
# pg_terminate_backend (57), and serialization failures / deadlocks (40).
_RETRIABLE_SQLSTATE_CLASSES = ("08", "53", "57", "40")


# Handshakes cut short by the network or a restarting server: worth a retry.
_TLS_CONNECTION_LOST = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)
# Certificate, key or CA files named in the connection settings.
_LOCAL_FILE_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def is_misconfiguration(exc: BaseException) -> bool:
    """True for connection failures that a retry cannot fix, only new settings.

    A certificate that does not verify (wrong CA, a name it does not carry), a
    server that refuses TLS which the sslmode requires, an unreadable certificate
    file, an sslmode asyncpg does not know. Many of these are OSErrors, which
    would otherwise count as a network outage.
    """
    if isinstance(exc, ssl.SSLError):
        return not isinstance(exc, _TLS_CONNECTION_LOST)
    if isinstance(exc, (asyncpg.ClientConfigurationError, *_LOCAL_FILE_ERRORS)):
        return True
    # asyncpg's words when the server answers "no TLS here" and the sslmode requires it.
    return isinstance(exc, ConnectionError) and "rejected SSL upgrade" in str(exc)


def misconfigured(what: str, exc: BaseException) -> ConfigError:
    """The ConfigError for a connection that is_misconfiguration() condemns."""
    return ConfigError(
        f"cannot connect to the {what}: {exc!r}; check its TLS settings "
        "(sslmode, sslrootcert, sslcert, sslkey) and certificates"
    )


# asyncpg's own words for a connection or pool that went away under a call.
_CONNECTION_GONE = ("connection is closed", "connection was closed", "pool is closing")


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same write later can succeed.

    Only what the server or the network did qualifies: a value the driver cannot
    encode (asyncpg's client-side DataError), an unsupported feature or a misuse
    of the driver fails the same way every time, so it is not retried.
    """
    if is_misconfiguration(exc):
        return False
    if isinstance(exc, OSError | TimeoutError | asyncpg.ConnectionDoesNotExistError):
        return True  # refused, reset, timed out, closed mid-query
    if type(exc) is asyncpg.InterfaceError:
        return any(words in str(exc) for words in _CONNECTION_GONE)
    if isinstance(exc, asyncpg.InternalClientError):
        return True  # a session ended mid-operation; Store closes that connection
    if isinstance(exc, asyncpg.PostgresError):
        return str(exc.sqlstate or "")[:2] in _RETRIABLE_SQLSTATE_CLASSES
    return False


# What the database or the driver refuses because of a value: the record's fault, so
# the store writes such a batch row by row and dead-letters what is refused.
# asyncpg.DataError is PostgreSQL's class 22; the driver's own, for a value it cannot
# encode, has the same name in asyncpg.exceptions._base.
REFUSED_DATA: tuple[type[Exception], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.exceptions._base.DataError,
)
