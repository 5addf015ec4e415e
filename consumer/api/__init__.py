"""The HTTP sidecar: operations endpoints, the analytics API and HTTP ingestion."""
