"""Settings: the only reader of the environment (``FLEET_`` prefix), frozen once built.

Secrets from files: every setting can also be read from a file named like its
environment variable (``FLEET_KAFKA_SASL_PASSWORD``, ``FLEET_DATABASE_URL``, ...;
the name's case does not matter) in the directory ``FLEET_SECRETS_DIR``, else in
``/run/secrets`` when that exists (Docker and Compose secrets). The file's content,
stripped of surrounding whitespace, is the value; an environment variable of the
same name wins over the file. Secrets are SecretStr: masked in repr, str and logs,
and validation errors never echo their input.
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import Field, FilePath, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

_DEFAULT_SECRETS_DIR = Path("/run/secrets")


def _secrets_dir() -> Path | None:
    """FLEET_SECRETS_DIR (which must exist), else /run/secrets if present, else none."""
    configured = os.environ.get("FLEET_SECRETS_DIR")
    if configured:
        path = Path(configured)
        if not path.is_dir():
            raise SettingsError(f"FLEET_SECRETS_DIR={configured} is not a directory")
        return path
    return _DEFAULT_SECRETS_DIR if _DEFAULT_SECRETS_DIR.is_dir() else None


class EfficiencyThresholds(NamedTuple):
    """The efficiency settings as exact decimals (through str: 0.85 stays 0.85 in NUMERIC,
    not the float just below it), in the order the SQL takes them."""

    min_ac_kwh: Decimal
    fault_below: Decimal
    anomalous_above: Decimal

    def status(self, ratio: Decimal) -> str:
        """A rated ratio's status (the SQL's fleet_efficiency_status for enough energy)."""
        if ratio < self.fault_below:
            return "fault"
        return "anomalous" if ratio > self.anomalous_above else "normal"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FLEET_",
        frozen=True,
        extra="ignore",
        # A validation error would otherwise quote the raw input, secrets included.
        hide_input_in_errors=True,
    )

    # Connections. The DSN is a secret: it may carry a password. TLS to PostgreSQL is
    # the DSN's: ?sslmode=verify-full&sslrootcert=/ca.pem (also sslcert, sslkey), else
    # PGSSLMODE; asyncpg's default is `prefer`, which may fall back to plaintext.
    kafka_bootstrap_servers: str = "localhost:9092"
    database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/fleet")

    # Topics.
    meter_topic: str = "meter-telemetry"
    vehicle_topic: str = "vehicle-telemetry"
    mixed_topic: str = "fleet-telemetry"
    dlq_topic: str = "telemetry-dlq"
    group_id: str = "fleet-ingest"

    # Batching is natural: a free write lane takes whatever has arrived at once; while
    # a lane writes, its next batch grows, up to this many records (also what a lane
    # holds in memory, besides the batch in flight).
    batch_max_records: int = Field(default=10_000, ge=1, le=100_000)
    # Transactions in flight at once, each on its own connection and its own
    # share of the partitions (a partition's batches always commit in order).
    write_lanes: int = Field(default=2, ge=1, le=16)

    # Memory bounds on what the Kafka client may hold.
    fetch_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_partition_fetch_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    # Kafka's fetch.max.wait.ms: how long a fetch may wait at the broker for records.
    # Apache Kafka answers as soon as records arrive, so this costs nothing there; brokers
    # that only answer when the wait is over (tansu) add up to this much latency.
    fetch_max_wait_ms: int = Field(default=100, ge=1, le=10_000)

    # Group membership.
    session_timeout_ms: int = Field(default=10_000, ge=1000)
    heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    max_poll_interval_ms: int = Field(default=300_000, ge=1000)

    # --- Kafka transport security: every client (consumer, producer, admin, simulator) ---
    # PLAINTEXT; SSL (TLS); SASL_SSL (TLS, then a login); SASL_PLAINTEXT (a login
    # without TLS, warned about with PLAIN since the password crosses in clear).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    # SASL only; aiokafka's default. The password is a secret: env or secrets file.
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    # TLS only. CA bundle (PEM) that signed the brokers' certificates; unset: the
    # system's trusted CAs. Client certificate and key (PEM) for mutual TLS; the key's
    # passphrase is a secret. Files must exist when the settings are read.
    kafka_ssl_cafile: FilePath | None = None
    kafka_ssl_certfile: FilePath | None = None
    kafka_ssl_keyfile: FilePath | None = None
    kafka_ssl_key_password: SecretStr | None = None
    # Check the broker's name against its certificate; turn off only for brokers
    # addressed by a name their certificate lacks (warned about at start).
    kafka_ssl_check_hostname: bool = True

    # Producer for the dead-letter topic (and, later, HTTP ingestion).
    # Leave on for real clusters; the embedded tansu broker does not support it.
    kafka_idempotent_producer: bool = True

    # Input rules.
    max_payload_bytes: int = Field(default=16 * 1024, ge=64)
    max_clock_skew_seconds: float = Field(default=300.0, ge=0)

    # Sink outage handling: capped exponential backoff with full jitter.
    retry_initial_seconds: float = Field(default=0.2, gt=0)
    retry_max_seconds: float = Field(default=10.0, gt=0)
    # A consumer paused in the middle of a transaction must not hold locks for ever.
    db_idle_in_transaction_timeout_ms: int = Field(default=30_000, ge=1000)
    # Longest a connect or a statement may take before the connection is given up for
    # dead and the call retried: a connection that died silently (no RST) must not
    # stall a lane.
    db_command_timeout_seconds: float = Field(default=30.0, gt=0)

    # History partitions prepared around "now" (months).
    partitions_months_back: int = Field(default=3, ge=0)
    partitions_months_ahead: int = Field(default=3, ge=1)
    # Drop whole monthly history partitions once entirely older than this; unset: keep all.
    history_retention_days: int | None = Field(default=None, ge=1)
    # How often partitions are prepared and retention applied (also the retry interval).
    maintenance_interval_seconds: float = Field(default=3600.0, ge=1)

    # --- charging sessions and alerts (the sessions role; `all` includes it) ---
    # A session ends when no delivering reading arrives for this long (event time).
    session_gap_minutes: float = Field(default=10.0, gt=0)
    # How long the watermark waits for late readings before it closes a session.
    session_lateness_minutes: float = Field(default=2.0, ge=0)
    sessions_interval_seconds: float = Field(default=1.0, gt=0)
    # A cycle takes at most this many batches' marks (all their devices at once).
    sessions_max_batches_per_cycle: int = Field(default=200, ge=1)
    # While behind a busy write path, the share of the time the worker may spend in cycles.
    sessions_max_busy_fraction: float = Field(default=0.1, gt=0, le=1)
    # charger_efficiency_low / meter_overreporting: the average of a meter's last N closed
    # sessions against the efficiency thresholds, resolved only past this margin.
    alert_sessions: int = Field(default=3, ge=1)
    alert_efficiency_margin: float = Field(default=0.02, ge=0)
    overheat_c: float = Field(default=55.0)
    overheat_readings: int = Field(default=2, ge=1)
    overheat_resolve_c: float = Field(default=50.0)
    silent_after_minutes: float = Field(default=15.0, gt=0)
    silent_active_hours: float = Field(default=24.0, gt=0)
    alerts_topic: str = "fleet-alerts"
    alerts_publish_interval_seconds: float = Field(default=0.5, gt=0)

    # HTTP (metrics, health; the analytics API joins it).
    http_host: str = "0.0.0.0"  # noqa: S104 -- a service port, bound on purpose
    http_port: int = Field(default=8080, ge=0, le=65535)

    # --- analytics API (sidecar): read side ---
    # The API's own connection (a replica, or a login granted the fleet_api role of
    # sql/007); unset: FLEET_DATABASE_URL. Always its own pool: analytics cannot take
    # the write lanes' connections, nor ingestion the API's.
    api_database_url: SecretStr | None = None
    api_pool_size: int = Field(default=8, ge=1, le=100)
    analytics_default_window_hours: int = Field(default=24, ge=1, le=24 * 366)
    analytics_max_window_days: int = Field(default=31, ge=1, le=366)
    # Efficiency = DC delivered / AC consumed: below the first is a fault, above
    # the second is physically impossible (bad data). The bounds keep fault <= anomalous.
    efficiency_fault_below: float = Field(default=0.85, gt=0, le=1)
    efficiency_anomalous_above: float = Field(default=1.0, ge=1)
    # Below this much AC energy a ratio says more about rounding than the charger.
    efficiency_min_ac_kwh: float = Field(default=0.5, ge=0)
    fleet_report_page_size: int = Field(default=100, ge=1, le=1000)

    # --- HTTP ingestion and security ---
    # Bearer tokens for /v1 (health, readiness, metrics and the OpenAPI document stay
    # open), comma-separated; each may name its scopes after a colon, joined by "+":
    # `t1:read,t2:read+ingest,t3:admin`. read: GET /v1; ingest: POST /v1/ingestion;
    # admin: every other write (meter assignments). A token without scopes has all three.
    api_tokens: SecretStr | None = None
    # Without tokens /v1 is refused (503 auth_not_configured) unless this is `off`: an
    # explicit choice for demos and tests, warned about at start.
    api_auth: Literal["tokens", "off"] = "tokens"
    # Token bucket per client (its bearer token, else its address), same routes, charged
    # by cost: a request costs 1, an ingested reading 1/100, a report 1 per day of window.
    rate_limit_per_second: float = Field(default=50.0, gt=0)
    rate_limit_burst: int = Field(default=100, ge=1)
    ingest_max_items: int = Field(default=1000, ge=1, le=100_000)
    ingest_max_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    # Any other JSON body (a meter assignment) is small.
    api_max_body_bytes: int = Field(default=16 * 1024, ge=1024, le=1024 * 1024)
    # Expensive reads: each API query is cancelled by the server past this long, and at
    # most this many fleet-wide reports run at once per process (the next gets a fast 503).
    api_statement_timeout_ms: int = Field(default=10_000, ge=100)
    api_max_concurrent_reports: int = Field(default=4, ge=1, le=100)
    # The fleet report keeps this many windows' rankings per process between pages (about
    # 0.5 KB per vehicle each), until the data under them changes; 0 ranks every page anew.
    api_report_cache_windows: int = Field(default=4, ge=0, le=100)
    # --- the live stream (GET /v1/stream) ---
    # A client that reconnects with Last-Event-ID gets what it missed within this long (the
    # change log keeps it; the ingest role prunes it every tenth of it), else a `reset` event.
    stream_replay_seconds: int = Field(default=300, ge=10, le=86_400)
    # How often each API process reads the change log; the floor of the stream's latency.
    stream_poll_interval_ms: int = Field(default=100, ge=10, le=10_000)
    # Each subscriber's backlog, in polls with events for it: a client further behind is
    # disconnected (reason queue_full) rather than slowing the others; one whose socket
    # takes longer than the send timeout to take an event likewise (send_timeout).
    stream_queue_polls: int = Field(default=100, ge=1, le=10_000)
    stream_send_timeout_seconds: float = Field(default=10.0, gt=0)
    stream_keepalive_seconds: float = Field(default=15.0, gt=0)
    # Open streams per client (bearer token, else address), and per process: 429/503 past them.
    stream_max_per_client: int = Field(default=20, ge=1, le=100_000)
    stream_max_subscribers: int = Field(default=2000, ge=1, le=1_000_000)

    # A read replica further behind than this is not ready (/readyz 503).
    api_max_replica_lag_seconds: float = Field(default=30.0, gt=0)

    # --- HTTP connections ---
    # An idle keep-alive connection, or one whose request head has not fully arrived
    # (a client sending headers a byte at a time), is closed after this long.
    http_idle_timeout_seconds: float = Field(default=15.0, gt=0)
    # A request body must arrive within this long (408 otherwise).
    http_body_timeout_seconds: float = Field(default=10.0, gt=0)
    # Open connections per client address; 0: no cap (behind a proxy every client has
    # the proxy's address).
    http_max_connections_per_address: int = Field(default=100, ge=0)
    # /metrics on a port of its own (scrapes apart from API traffic); unset: FLEET_HTTP_PORT.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)

    log_level: str = "INFO"
    log_json: bool | None = None  # None: JSON unless stdout is a terminal

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then the environment, then secret files (see the module docstring)."""
        secrets_dir = _secrets_dir()
        if secrets_dir is not None:
            file_secret_settings = SecretsSettingsSource(settings_cls, secrets_dir=secrets_dir)
        return init_settings, env_settings, dotenv_settings, file_secret_settings

    @model_validator(mode="after")
    def _kafka_security_is_complete(self) -> Settings:
        """Refuse combinations that would fail at the broker, or quietly not do what they say."""
        protocol = self.kafka_security_protocol
        chosen = f"FLEET_KAFKA_SECURITY_PROTOCOL={protocol}"
        credentials = {
            "FLEET_KAFKA_SASL_USERNAME": bool(self.kafka_sasl_username),
            "FLEET_KAFKA_SASL_PASSWORD": bool(
                self.kafka_sasl_password and self.kafka_sasl_password.get_secret_value()
            ),
        }
        if protocol.startswith("SASL_"):
            missing = [name for name, given in credentials.items() if not given]
            if missing:
                raise ValueError(f"{chosen} needs {' and '.join(missing)}")
        elif any(credentials.values()):
            given = [name for name, is_set in credentials.items() if is_set]
            raise ValueError(
                f"{' and '.join(given)} set, but {chosen} does not log in: "
                "use SASL_SSL (or SASL_PLAINTEXT)"
            )
        tls_files = {
            "FLEET_KAFKA_SSL_CAFILE": self.kafka_ssl_cafile,
            "FLEET_KAFKA_SSL_CERTFILE": self.kafka_ssl_certfile,
            "FLEET_KAFKA_SSL_KEYFILE": self.kafka_ssl_keyfile,
            "FLEET_KAFKA_SSL_KEY_PASSWORD": self.kafka_ssl_key_password,
        }
        if protocol not in ("SSL", "SASL_SSL"):
            given = [name for name, value in tls_files.items() if value is not None]
            if not self.kafka_ssl_check_hostname:
                given.append("FLEET_KAFKA_SSL_CHECK_HOSTNAME=false")
            if given:
                raise ValueError(
                    f"{', '.join(given)} set, but {chosen} does not use TLS: use SSL or SASL_SSL"
                )
        if self.kafka_ssl_certfile is None and (
            self.kafka_ssl_keyfile is not None or self.kafka_ssl_key_password is not None
        ):
            raise ValueError(
                "FLEET_KAFKA_SSL_KEYFILE and FLEET_KAFKA_SSL_KEY_PASSWORD belong to a client "
                "certificate: set FLEET_KAFKA_SSL_CERTFILE too"
            )
        return self

    @property
    def efficiency_thresholds(self) -> EfficiencyThresholds:
        return EfficiencyThresholds(
            Decimal(str(self.efficiency_min_ac_kwh)),
            Decimal(str(self.efficiency_fault_below)),
            Decimal(str(self.efficiency_anomalous_above)),
        )

    @property
    def topics(self) -> tuple[str, str, str]:
        return (self.meter_topic, self.vehicle_topic, self.mixed_topic)
