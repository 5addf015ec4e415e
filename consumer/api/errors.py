"""HTTP errors: a status, a stable machine-readable code and a message for people."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import asyncpg


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})  # Retry-After, WWW-Authenticate


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


@contextlib.contextmanager
def writes_refused_as_read_only(what: str) -> Iterator[None]:
    """A write the database refuses for its login (sql/009's fleet_reader) or because it is a
    read-only replica: 403 read_only, nothing changed."""
    try:
        yield
    except (asyncpg.InsufficientPrivilegeError, asyncpg.ReadOnlySQLTransactionError):
        raise ApiError(
            403, "read_only", f"the API's database role may not write: {what} are read-only here"
        ) from None
