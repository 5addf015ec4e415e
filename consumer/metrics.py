"""Every metric the service exports, defined once. No device ids as labels."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

INGEST_RECORDS = Counter(
    "fleet_ingest_records_total",
    "Readings by stream and outcome: stored (new history row), duplicate (re-sent reading "
    "already stored), stale (stored, but older than the live row, so live kept the newer), "
    "rejected (dead-lettered).",
    ["stream", "outcome"],
)
BATCH_RECORDS = Histogram(
    "fleet_batch_records",
    "Kafka records per committed batch.",
    buckets=(1, 10, 50, 100, 500, 1000, 2500, 5000, 10000, 25000),
)
BATCH_WRITE_SECONDS = Histogram(
    "fleet_batch_write_duration_seconds",
    "Time to write and commit one batch transaction.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
FRESHNESS_SECONDS = Histogram(
    "fleet_ingest_freshness_seconds",
    "Event time to commit time of the newest reading in each batch (includes the device's "
    "clock skew and its time to reach Kafka).",
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
)
CONSUMER_LAG = Gauge(
    "fleet_consumer_lag_records",
    "Records behind the partition's high watermark, per assigned partition.",
    ["topic", "partition"],
)
SINK_RETRIES = Counter(
    "fleet_sink_retries_total",
    "Database calls of the consumer (batch writes, partition claims, offset resets) retried "
    "because the database was unavailable.",
)
PARTITIONS_HALTED = Gauge(
    "fleet_partitions_halted",
    "Assigned partitions this member stopped reading at a record batch it cannot decode "
    "(corrupt, or compressed with a codec it lacks): the log names topic, partition and "
    "offset. Alert on any non-zero value.",
    ["topic"],
)
SINK_AVAILABLE = Gauge(
    "fleet_sink_available",
    "1 while the database takes writes, 0 while the consumer is paused waiting for it.",
)
FENCED_BATCHES = Counter(
    "fleet_fenced_batches_total",
    "Batches rolled back because another group member owns one of their partitions.",
)
OFFSET_RESETS = Counter(
    "fleet_offset_resets_total",
    "Partitions whose stored offset was outside the broker's log (data lost on the broker, "
    "topic recreated, or retention deleted unconsumed records); consumption resumed from the "
    "log start. Alert on any increase.",
    ["topic"],
)
HISTORY_PARTITIONS_DROPPED = Counter(
    "fleet_history_partitions_dropped_total",
    "Monthly history partitions dropped by the retention policy (FLEET_HISTORY_RETENTION_DAYS).",
)
MAINTENANCE_ERRORS = Counter(
    "fleet_maintenance_errors_total",
    "History maintenance runs (partitions ahead, retention) that failed; each is retried at "
    "the next interval (FLEET_MAINTENANCE_INTERVAL_SECONDS).",
)
MAINTENANCE_LAST_SUCCESS = Gauge(
    "fleet_maintenance_last_success_timestamp_seconds",
    "When history maintenance last succeeded (Unix time); alert when it is older than a "
    "few intervals: monthly partitions stop being prepared ahead.",
)
HISTORY_DEFAULT_ROWS = Gauge(
    "fleet_history_default_rows",
    "Readings in the default history partition (outside every prepared month): "
    "should stay near zero; they move to their month's partition when it is prepared.",
    ["stream"],
)
DLQ_PUBLISH_FAILURES = Counter(
    "fleet_dlq_publish_failures_total",
    "Dead letters stored in PostgreSQL but not published to the dead-letter topic.",
)
DB_POOL_CONNECTIONS = Gauge(
    "fleet_db_pool_connections",
    "Database pool connections by pool (store: FLEET_DATABASE_URL; api: FLEET_API_DATABASE_URL)"
    " and state (in_use, idle, max).",
    ["pool", "state"],
)
HTTP_REQUEST_SECONDS = Histogram(
    "fleet_http_request_duration_seconds",
    "HTTP requests by route template (never the raw path), method and status.",
    ["route", "method", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
API_REPLICA_LAG_SECONDS = Gauge(
    "fleet_api_replica_lag_seconds",
    "How far the API's database is behind its primary (0 on a primary or a caught-up "
    "standby); past FLEET_API_MAX_REPLICA_LAG_SECONDS the API reports not ready.",
)
HTTP_INGEST_ITEMS = Counter(
    "fleet_http_ingest_items_total",
    "Readings posted to the ingestion endpoint: accepted (acknowledged by the broker) "
    "or rejected (failed validation, reported back to the caller).",
    ["outcome"],
)

SESSIONS_CLOSED = Counter(
    "fleet_sessions_closed_total", "Charging sessions closed by the watermark"
)
SESSIONS_WATERMARK = Gauge(
    "fleet_sessions_watermark_timestamp_seconds",
    "The sessions worker's watermark (event time): sessionizer lag = now - this",
)
SESSIONS_CYCLE_SECONDS = Histogram(
    "fleet_sessions_cycle_seconds", "One sessions-worker cycle (marks, sessions, alerts)"
)
SESSIONS_PENDING = Gauge(
    "fleet_sessions_pending_batches",
    "Batches whose marks the sessions worker has not taken yet (sessions and hourly totals "
    "trail the write path by these)",
)
SESSIONS_ERRORS = Counter("fleet_sessions_errors_total", "Sessions-worker cycles that failed")
ALERTS_OPEN = Gauge("fleet_alerts_open", "Unresolved alerts (open or acknowledged)", ["kind"])
ALERT_TRANSITIONS = Counter(
    "fleet_alert_transitions_total", "Alert transitions recorded", ["kind", "state"]
)
ALERTS_PUBLISHED = Counter(
    "fleet_alerts_published_total", "Alert transitions sent to the alerts topic"
)
ALERT_PUBLISH_ERRORS = Counter(
    "fleet_alert_publish_errors_total", "Failed attempts to publish alert transitions"
)

STREAM_SUBSCRIBERS = Gauge("fleet_stream_subscribers", "Open GET /v1/stream connections")
STREAM_EVENTS = Counter(
    "fleet_stream_events_total", "Events sent on GET /v1/stream, by event", ["event"]
)
STREAM_DROPPED = Counter(
    "fleet_stream_dropped_total",
    "Stream subscribers disconnected by the server, by reason (queue_full, send_timeout)",
    ["reason"],
)
STREAM_POLL_ERRORS = Counter(
    "fleet_stream_poll_errors_total", "Reads of the stream's change log that failed (retried)"
)
