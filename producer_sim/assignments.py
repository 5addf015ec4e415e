"""Writing the simulated fleet's vehicle -> meter assignments to PostgreSQL.

The analytics find a vehicle's charger in ``vehicle_meter_assignments``; the
simulator knows it, so it records it from the start of the run on. Idempotent:
a vehicle that already has a meter over that time keeps it (a re-run adds nothing).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

import asyncpg

# The overlap trigger would refuse (not skip) a vehicle already assigned over
# [valid_from, ...), so such vehicles are filtered out before the insert.
INSERT_ASSIGNMENTS = """
INSERT INTO vehicle_meter_assignments (vehicle_id, meter_id, valid_from)
SELECT a.vehicle_id, a.meter_id, $3::timestamptz
  FROM unnest($1::text[], $2::text[]) AS a(vehicle_id, meter_id)
 WHERE NOT EXISTS (
       SELECT 1 FROM vehicle_meter_assignments x
        WHERE x.vehicle_id = a.vehicle_id
          AND tstzrange(x.valid_from, x.valid_to) && tstzrange($3::timestamptz, NULL))
ON CONFLICT DO NOTHING
"""


async def write_assignments(dsn: str, charger: Mapping[str, str], valid_from: datetime) -> int:
    """Assign each vehicle its meter from ``valid_from`` on; return how many were new."""
    if valid_from.utcoffset() is None:
        raise ValueError("valid_from must be timezone-aware")
    conn = await asyncpg.connect(dsn)
    try:
        status: str = await conn.execute(
            INSERT_ASSIGNMENTS, list(charger), list(charger.values()), valid_from
        )
    finally:
        await conn.close()
    return int(status.rsplit(" ", 1)[-1])  # "INSERT 0 <rows>"
