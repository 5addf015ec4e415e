"""Fleet telemetry consumer: Kafka in, PostgreSQL out."""
