"""CLI: ``python -m consumer migrate | run``. Builds Settings once and passes it down."""

from __future__ import annotations

import argparse
import asyncio
import sys

import structlog
from pydantic import ValidationError
from pydantic_settings import SettingsError

from consumer.errors import ConfigError, is_misconfiguration, misconfigured
from consumer.log import configure_logging
from consumer.migrate import migrate
from consumer.service import Role, Service
from consumer.settings import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m consumer")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="apply sql/ to FLEET_DATABASE_URL (idempotent)")
    run = commands.add_parser("run", help="run the consumer group and the HTTP sidecar")
    run.add_argument(
        "--role",
        choices=[r.value for r in Role],
        default=Role.ALL.value,
        help="all (default); ingest: consumer with health and metrics; api: the HTTP API alone",
    )
    run.add_argument("--max-batches", type=int, help="exit after this many committed batches")
    run.add_argument(
        "--idle-timeout", type=float, help="exit after this many seconds without records"
    )
    return parser


async def _run(settings: Settings, args: argparse.Namespace) -> None:
    service = Service(settings, Role(args.role))
    service.install_signal_handlers()
    await service.run(max_batches=args.max_batches, idle_timeout=args.idle_timeout)


async def _migrate(dsn: str) -> list[str]:
    try:
        return await migrate(dsn)
    except Exception as exc:
        if is_misconfiguration(exc):  # as `run` does: waiting or a traceback would not help
            raise misconfigured("database", exc) from exc
        raise


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings()
    except (ValidationError, SettingsError) as exc:
        # Plain words on stderr, no traceback; inputs are hidden, so no secret is echoed.
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_json)
    log = structlog.get_logger("consumer")
    try:
        if args.command == "migrate":
            applied = asyncio.run(_migrate(settings.database_url.get_secret_value()))
            log.info("migrated", applied=applied)
        else:
            asyncio.run(_run(settings, args))
    except ConfigError as exc:
        log.error("configuration_error", error=str(exc))  # noqa: TRY400 -- the message is the help
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
