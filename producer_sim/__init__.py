"""Fleet simulator: a deterministic model of meters and EVs, and a Kafka publisher for it."""
