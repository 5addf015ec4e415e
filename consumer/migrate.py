"""Apply sql/NNN_*.sql in order, once each; safe to run twice or from several processes.

Each file runs in its own transaction together with its row in
``schema_migrations``; an advisory lock serialises concurrent runs. A file
that was applied and has changed since is an error: landed files are never edited.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import unquote, urlsplit

import asyncpg
import structlog

from consumer.errors import ConfigError

# Package data: installed beside this module, so `migrate` works from any directory.
SQL_DIR = Path(__file__).resolve().parent / "sql"
_LOCK_KEY = 0x666C656574  # "fleet"
# Texts a file had when it was applied somewhere, besides its current one. 001 was once
# edited after it had landed (its indexes gained INCLUDE, now in 010); databases that
# applied that text are as migrated as those that applied the original.
_EARLIER_DIGESTS = {
    "001_history.sql": {"057cef5573e3e81c37ff40ee7bb2d9e771f9f443f843166f26a787a8203decce"},
}
log = structlog.get_logger(__name__)


def migration_files(sql_dir: Path = SQL_DIR) -> list[Path]:
    return sorted(p for p in sql_dir.glob("[0-9][0-9][0-9]_*.sql"))


async def connect_creating_database(dsn: str) -> asyncpg.Connection:
    """Connect; if the database does not exist yet, create it first (fresh machines)."""
    try:
        return await asyncpg.connect(dsn)
    except asyncpg.InvalidCatalogNameError:
        database = unquote(urlsplit(dsn).path.lstrip("/"))
        if not database:
            raise
        admin = await asyncpg.connect(dsn, database="postgres")
        try:
            quoted = database.replace('"', '""')
            await admin.execute(f'CREATE DATABASE "{quoted}"')
        except asyncpg.DuplicateDatabaseError:
            pass  # another process created it first
        finally:
            await admin.close()
        return await asyncpg.connect(dsn)


async def migrate(dsn: str, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply what has not run yet; returns the names of the files applied now."""
    if not migration_files(sql_dir):  # an install without sql/ would "succeed" doing nothing
        raise ConfigError(f"no migrations in {sql_dir}: run from the source tree or the image")
    conn = await connect_creating_database(dsn)
    applied_now: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   filename   text PRIMARY KEY,
                   sha256     text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = dict(await conn.fetch("SELECT filename, sha256 FROM schema_migrations"))
        for path in migration_files(sql_dir):
            text = path.read_text(encoding="utf-8")
            digest = hashlib.sha256(text.encode()).hexdigest()
            if path.name in done:
                if done[path.name] not in {digest, *_EARLIER_DIGESTS.get(path.name, ())}:
                    raise ConfigError(f"{path.name} changed after it was applied; add a new file")
                continue
            async with conn.transaction():
                await conn.execute(text)
                await conn.execute(
                    "INSERT INTO schema_migrations (filename, sha256) VALUES ($1, $2)",
                    path.name,
                    digest,
                )
            log.info("migration_applied", file=path.name)
            applied_now.append(path.name)
    finally:
        await conn.close()  # closing the session releases the advisory lock
    return applied_now
