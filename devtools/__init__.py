"""Development tooling: local servers, the consumer-process runner, reading factories.

Used by the tests, the benchmarks, the chaos harness and the demo; never shipped (the
package and its image contain consumer/ and producer_sim/ only). Import it from the
repository's root: pytest does, and the scripts run as `python -m scripts....`.
"""
