"""The analytics queries. All arithmetic stays in NUMERIC; all input arrives as parameters.

Both efficiency queries build a ``totals`` relation (vehicle_id, meter_ids, dc,
temp, vehicle_readings, linked, ac, meter_readings) and share ``_CLASSIFIED``,
so the fleet report rates a vehicle exactly as the single-vehicle endpoint does.
Parameters $1..$3 are always the thresholds: minimum AC kWh, fault-below, anomalous-above.

A vehicle's meter over time comes from vehicle_meter_assignments: each assignment
overlapping the window, clipped to it, counts that meter's energy over exactly
the clipped interval [lo, hi). Windows are half-open everywhere.
"""

from __future__ import annotations

_CLASSIFIED = """
rated AS (
    SELECT t.*, CASE WHEN t.linked AND t.ac > 0 THEN round(t.dc / t.ac, 4) END AS ratio
      FROM totals t
),
classified AS (
    SELECT r.*,
           CASE
               WHEN NOT r.linked THEN 'unlinked'
               -- ac = 0 as well: a zero threshold must not rate a meter that saw nothing.
               WHEN r.ac = 0 OR r.ac < $1::numeric THEN 'insufficient_data'
               WHEN r.ratio < $2::numeric THEN 'fault'
               WHEN r.ratio > $3::numeric THEN 'anomalous'
               ELSE 'normal'
           END AS status
      FROM rated r
)
"""

# $4 vehicle id, $5 from, $6 to, $7 meter id override (NULL: use the assignments).
# The LATERAL sums one meter over one clipped interval: an index range scan each.
PERFORMANCE = f"""
WITH vehicle AS (
    SELECT sum(kwh_delivered_dc) AS dc, avg(battery_temp) AS temp, count(*) AS readings
      FROM vehicle_history
     WHERE vehicle_id = $4::text AND "timestamp" >= $5::timestamptz AND "timestamp" < $6::timestamptz
),
spans AS (
    SELECT $7::text AS meter_id, $5::timestamptz AS lo, $6::timestamptz AS hi
     WHERE $7::text IS NOT NULL
    UNION ALL
    SELECT meter_id, greatest(valid_from, $5::timestamptz), least(coalesce(valid_to, $6::timestamptz), $6::timestamptz)
      FROM vehicle_meter_assignments
     WHERE $7::text IS NULL AND vehicle_id = $4::text
       AND valid_from < $6::timestamptz AND (valid_to IS NULL OR valid_to > $5::timestamptz)
),
meter AS (
    SELECT count(*) > 0 AS linked, coalesce(sum(m.kwh), 0) AS ac,
           coalesce(sum(m.readings), 0)::bigint AS readings
      FROM spans s
     CROSS JOIN LATERAL (
           SELECT sum(h.kwh_consumed_ac) AS kwh, count(*) AS readings
             FROM meter_history h
            WHERE h.meter_id = s.meter_id AND h."timestamp" >= s.lo AND h."timestamp" < s.hi
              -- Implied by the span, but a parameter: prunes the months outside the window.
              AND h."timestamp" >= $5::timestamptz AND h."timestamp" < $6::timestamptz
           ) m
),
meter_ids AS (
    SELECT coalesce(array_agg(meter_id ORDER BY first_used), '{{}}') AS ids
      FROM (SELECT meter_id, min(lo) AS first_used FROM spans GROUP BY meter_id) u
),
totals AS (
    SELECT $4::text AS vehicle_id, i.ids AS meter_ids, coalesce(v.dc, 0) AS dc, v.temp,
           v.readings AS vehicle_readings, m.linked, m.ac, m.readings AS meter_readings
      FROM vehicle v, meter m, meter_ids i
),
{_CLASSIFIED}
SELECT meter_ids, round(dc, 3) AS dc, CASE WHEN linked THEN round(ac, 3) END AS ac,
       round(temp, 2) AS temp, ratio, status, vehicle_readings, meter_readings
  FROM classified
"""

# $4 from, $5 to (whole UTC hours), $6 status filter (NULL: all), $7 cursor ratio, $8 cursor
# vehicle id (NULL: first page), $9 page size. Order: lowest ratio first, NULL ratios last,
# then vehicle id; the cursor is the last row's (ratio, vehicle id).
#
# From the hourly totals (sql/014), not history: a device's energy over [a, b) is its running
# total before b less its running total before a, each its row of the hour just before (one
# row per device, by index) or, for a device without one, its latest row before. A span of
# an assignment that starts or ends inside the window (the vehicle moved to another meter)
# reads history for the part of an hour it covers. In Wh, exact integers, until the end.
# meter_ids comes in span order, a meter repeated if the vehicle came back to it.
_BEFORE = """(SELECT h.through_{what} FROM {table} h
      WHERE h.{device} = {key} AND h.hour < {at} ORDER BY h.hour DESC LIMIT 1)"""


def _before(table: str, device: str, key: str, at: str, what: str = "wh") -> str:
    return _BEFORE.format(what=what, table=table, device=device, key=key, at=at)


def _metered(after: str, before: str) -> str:
    """A meter's Wh over [after, before) from history: the part of an hour a span covers."""
    return f"""coalesce((SELECT (1000 * sum(h.kwh_consumed_ac))::bigint FROM meter_history h
      WHERE h.meter_id = s.meter_id AND h."timestamp" >= {after} AND h."timestamp" < {before}
        AND h."timestamp" >= $4::timestamptz AND h."timestamp" < $5::timestamptz), 0)"""


_EARLIER = "$4::timestamptz > fh.at"  # no row is before the first one: no probe needed
FLEET_EFFICIENCY = f"""
WITH spans AS NOT MATERIALIZED (  -- inlined: the planner sees the assignments' statistics
    SELECT vehicle_id, meter_id, lo, hi,
           -- the span's whole hours: [first_hour, last_hour)
           fleet_hour(lo - interval '1 microsecond') + interval '1 hour' AS first_hour,
           fleet_hour(hi) AS last_hour
      FROM (SELECT vehicle_id, meter_id,
                   greatest(valid_from, $4::timestamptz) AS lo,
                   least(coalesce(valid_to, $5::timestamptz), $5::timestamptz) AS hi
              FROM vehicle_meter_assignments
             WHERE valid_from < $5::timestamptz AND (valid_to IS NULL OR valid_to > $4::timestamptz)) a
),
first_hour AS (SELECT least((SELECT min(hour) FROM vehicle_hourly),
                            (SELECT min(hour) FROM meter_hourly)) AS at),
vehicle AS (
    SELECT v.vehicle_id,
           coalesce(t.through_wh, {_before("vehicle_hourly", "vehicle_id", "v.vehicle_id", "$5::timestamptz")})
         - coalesce(f.through_wh, CASE WHEN {_EARLIER} THEN {_before("vehicle_hourly", "vehicle_id", "v.vehicle_id", "$4::timestamptz")} END, 0) AS wh,
           coalesce(t.through_readings, {_before("vehicle_hourly", "vehicle_id", "v.vehicle_id", "$5::timestamptz", "readings")})
         - coalesce(f.through_readings, CASE WHEN {_EARLIER} THEN {_before("vehicle_hourly", "vehicle_id", "v.vehicle_id", "$4::timestamptz", "readings")} END, 0) AS readings
      FROM (SELECT DISTINCT vehicle_id FROM spans) v
     CROSS JOIN first_hour fh
      LEFT JOIN vehicle_hourly t ON t.vehicle_id = v.vehicle_id AND t.hour = $5::timestamptz - interval '1 hour'
      LEFT JOIN vehicle_hourly f ON f.vehicle_id = v.vehicle_id AND f.hour = $4::timestamptz - interval '1 hour'
),
span_wh AS (
    SELECT s.vehicle_id, s.meter_id, s.lo,
           CASE WHEN s.lo = $4::timestamptz AND s.hi = $5::timestamptz THEN
                coalesce(t.through_wh, {_before("meter_hourly", "meter_id", "s.meter_id", "$5::timestamptz")}, 0)
              - coalesce(f.through_wh, CASE WHEN {_EARLIER} THEN {_before("meter_hourly", "meter_id", "s.meter_id", "$4::timestamptz")} END, 0)
           ELSE
                CASE WHEN s.first_hour < s.last_hour THEN
                    coalesce({_before("meter_hourly", "meter_id", "s.meter_id", "s.last_hour")}, 0)
                  - coalesce({_before("meter_hourly", "meter_id", "s.meter_id", "s.first_hour")}, 0)
                ELSE 0 END
              + CASE WHEN s.lo < s.first_hour THEN {_metered("s.lo", "least(s.first_hour, s.hi)")} ELSE 0 END
              + CASE WHEN s.hi > greatest(s.last_hour, s.first_hour)
                     THEN {_metered("greatest(s.last_hour, s.first_hour)", "s.hi")} ELSE 0 END
           END AS wh
      FROM spans s
     CROSS JOIN first_hour fh
      LEFT JOIN meter_hourly t ON t.meter_id = s.meter_id AND t.hour = $5::timestamptz - interval '1 hour'
      LEFT JOIN meter_hourly f ON f.meter_id = s.meter_id AND f.hour = $4::timestamptz - interval '1 hour'
),
meter AS (
    SELECT vehicle_id, array_agg(meter_id ORDER BY lo) AS meter_ids, sum(wh) AS wh
      FROM span_wh
     GROUP BY vehicle_id
),
totals AS (
    SELECT v.vehicle_id, m.meter_ids, true AS linked,
           (v.wh::numeric / 1000)::numeric(20,3) AS dc, (m.wh / 1000)::numeric(20,3) AS ac
      FROM vehicle v
      JOIN meter m ON m.vehicle_id = v.vehicle_id
     WHERE v.readings > 0  -- readings in the window
),
{_CLASSIFIED}
SELECT vehicle_id, meter_ids, dc, ac, ratio, status
  FROM classified
 WHERE ($6::text IS NULL OR status = $6::text)
   AND ($8::text IS NULL
        OR CASE WHEN $7::numeric IS NULL THEN ratio IS NULL AND vehicle_id > $8::text
                ELSE ratio IS NULL OR ratio > $7::numeric
                     OR (ratio = $7::numeric AND vehicle_id > $8::text)
           END)
 ORDER BY ratio ASC NULLS LAST, vehicle_id
 LIMIT $9::int
"""

ASSIGNMENTS = """
SELECT meter_id, valid_from, valid_to
  FROM vehicle_meter_assignments
 WHERE vehicle_id = $1
 ORDER BY valid_from
"""

# The same per-vehicle lock the no-overlap trigger takes: concurrent PUTs for one
# vehicle queue here, so reading the open assignment and replacing it is atomic.
LOCK_VEHICLE_ASSIGNMENTS = """
SELECT pg_advisory_xact_lock(hashtext('vehicle_meter_assignments'), hashtext($1))
"""

OPEN_ASSIGNMENT = """
SELECT meter_id, valid_from
  FROM vehicle_meter_assignments
 WHERE vehicle_id = $1 AND valid_to IS NULL
"""

CLOSE_ASSIGNMENT = """
UPDATE vehicle_meter_assignments SET valid_to = $3 WHERE vehicle_id = $1 AND valid_from = $2
"""

OPEN_NEW_ASSIGNMENT = """
INSERT INTO vehicle_meter_assignments (vehicle_id, meter_id, valid_from) VALUES ($1, $2, $3)
"""

VEHICLE_LIVE = """
SELECT vehicle_id, soc, kwh_delivered_dc, battery_temp, "timestamp", updated_at
  FROM vehicle_live
 WHERE vehicle_id = $1
"""

METER_LIVE = """
SELECT meter_id, kwh_consumed_ac, voltage, "timestamp", updated_at
  FROM meter_live
 WHERE meter_id = $1
"""
