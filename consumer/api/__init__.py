"""The HTTP sidecar: operations endpoints now; the analytics API joins them."""
