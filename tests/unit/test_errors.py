"""Which failures are worth a retry: the server's and the network's, never the data's."""

from __future__ import annotations

import asyncpg
import pytest

from consumer.errors import REFUSED_DATA, is_transient


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError("reset by peer"),
        TimeoutError(),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.InterfaceError("cannot perform operation: connection is closed"),
        asyncpg.InterfaceError("pool is closing"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.SerializationError("could not serialize access"),
    ],
)
def test_what_the_server_or_network_did_is_retried(error: Exception) -> None:
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions._base.DataError("invalid input for query argument $7"),
        asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
        asyncpg.UnsupportedClientFeatureError("not supported"),
        asyncpg.UndefinedFunctionError("function fleet_write_batch does not exist"),
        asyncpg.CheckViolationError("violates check constraint"),
    ],
)
def test_what_fails_the_same_way_every_time_is_not_retried(error: Exception) -> None:
    assert not is_transient(error)


def test_the_drivers_and_the_servers_data_errors_both_go_row_by_row() -> None:
    """A batch refused for a value is split so only the refused readings are dead-lettered."""
    assert isinstance(asyncpg.exceptions._base.DataError("x"), REFUSED_DATA)
    assert isinstance(asyncpg.InvalidTextRepresentationError("x"), REFUSED_DATA)
    assert isinstance(asyncpg.UniqueViolationError("x"), REFUSED_DATA)
