"""Settings: the only reader of the environment (``FLEET_`` prefix), frozen once built."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEET_", frozen=True, extra="ignore")

    # Connections. The DSN is a secret: it may carry a password.
    kafka_bootstrap_servers: str = "localhost:9092"
    database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/fleet")

    # Topics.
    meter_topic: str = "meter-telemetry"
    vehicle_topic: str = "vehicle-telemetry"
    mixed_topic: str = "fleet-telemetry"
    dlq_topic: str = "telemetry-dlq"
    group_id: str = "fleet-ingest"

    # Batching: a batch closes at whichever limit comes first.
    batch_max_records: int = Field(default=10_000, ge=1, le=100_000)
    batch_max_wait_ms: int = Field(default=500, ge=1, le=60_000)
    # Transactions in flight at once, each on its own connection and its own
    # share of the partitions (a partition's batches always commit in order).
    write_lanes: int = Field(default=2, ge=1, le=16)

    # Memory bounds on what the Kafka client may hold.
    fetch_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_partition_fetch_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)

    # Group membership.
    session_timeout_ms: int = Field(default=10_000, ge=1000)
    heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    max_poll_interval_ms: int = Field(default=300_000, ge=1000)

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

    # History partitions prepared around "now" (months).
    partitions_months_back: int = Field(default=3, ge=0)
    partitions_months_ahead: int = Field(default=3, ge=1)
    # Drop whole monthly history partitions once entirely older than this; unset: keep all.
    history_retention_days: int | None = Field(default=None, ge=1)

    # HTTP (metrics, health; the analytics API joins it).
    http_host: str = "0.0.0.0"  # noqa: S104 -- a service port, bound on purpose
    http_port: int = Field(default=8080, ge=0, le=65535)

    # --- analytics API (sidecar): read side ---
    # The API's own connection (a replica, or a login granted the fleet_api role of
    # sql/007); unset: FLEET_DATABASE_URL.
    api_database_url: SecretStr | None = None
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
    # Comma-separated bearer tokens for the API (health, metrics and the OpenAPI
    # document stay open); unset turns authentication off.
    api_tokens: SecretStr | None = None
    # Token bucket per client (its bearer token, else its address), same routes.
    rate_limit_per_second: float = Field(default=50.0, gt=0)
    rate_limit_burst: int = Field(default=100, ge=1)
    ingest_max_items: int = Field(default=1000, ge=1, le=100_000)
    ingest_max_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)

    log_level: str = "INFO"
    log_json: bool | None = None  # None: JSON unless stdout is a terminal

    @property
    def topics(self) -> tuple[str, str, str]:
        return (self.meter_topic, self.vehicle_topic, self.mixed_topic)
