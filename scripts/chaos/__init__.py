"""`make chaos`: the platform's promises under faults, as figures anyone can reproduce.

Runs on this machine's own stand-ins: a tansu broker and a private PostgreSQL server
(scratch data in .chaos/) that this script may crash, with 2-3 consumer processes
(`python -m consumer run --role ingest`). Phases:

1. soak: >= 1,000,000 valid readings from the simulator, with bad messages, re-sent
   duplicates, late readings and skewed clocks switched on, into the mixed topic and
   the dedicated topics (8 partitions each), paced so they keep arriving while the
   harness SIGKILLs a random consumer every 5-15 s (restarting it 0-5 s later), scales
   the group to three members and back, crashes PostgreSQL (immediate stop, restarted
   at once, during writes), restarts it (fast stop, down for 5 s) and terminates the
   consumers' backends in the middle of their batch transactions;
2. outage: PostgreSQL down for --outage-seconds (120) while readings keep arriving: no
   member may leave the group (no partition re-claimed), memory stays bounded, then
   everything is caught up;
3. outage past max.poll.interval.ms: the same with members running at 20 s;
4. broker restart: the broker comes back empty (topics recreated, offsets start over):
   the members must alert (log line and fleet_offset_resets_total) and resume;
5. the fast proofs of `make test`: bad-input corpus, zombie, API fuzz with auth.

Then it compares what PostgreSQL holds with what was published: history rows against
the distinct valid readings as sets of (device, timestamp), duplicates, every live row
against its device's newest reading, dead letters by reason against the injected bad
messages, stored offsets against every partition's log end. It prints the faults
injected and the anomalies found; the exit status is 1 if any anomaly is not zero.
Broker, database, consumers and this harness share the machine's cores.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / ".chaos"
PARTITIONS = 8
INTERVAL = timedelta(minutes=1)


def log(message: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", flush=True)
