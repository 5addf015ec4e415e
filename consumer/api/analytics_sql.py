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

# $4 from, $5 to, $6 status filter (NULL: all), $7 cursor ratio, $8 cursor vehicle id
# (NULL: first page), $9 page size. Order: lowest ratio first, NULL ratios last,
# then vehicle id; the cursor is the last row's (ratio, vehicle id).
FLEET_EFFICIENCY = f"""
WITH spans AS (
    SELECT vehicle_id, meter_id,
           greatest(valid_from, $4::timestamptz) AS lo,
           least(coalesce(valid_to, $5::timestamptz), $5::timestamptz) AS hi
      FROM vehicle_meter_assignments
     WHERE valid_from < $5::timestamptz AND (valid_to IS NULL OR valid_to > $4::timestamptz)
),
vehicle AS (
    SELECT h.vehicle_id, sum(h.kwh_delivered_dc) AS dc
      FROM vehicle_history h
     WHERE h."timestamp" >= $4::timestamptz AND h."timestamp" < $5::timestamptz
       AND h.vehicle_id IN (SELECT vehicle_id FROM spans)
     GROUP BY h.vehicle_id
),
meter AS (
    SELECT s.vehicle_id, coalesce(sum(h.kwh_consumed_ac), 0) AS ac
      FROM spans s
      LEFT JOIN meter_history h
        ON h.meter_id = s.meter_id AND h."timestamp" >= s.lo AND h."timestamp" < s.hi
       AND h."timestamp" >= $4::timestamptz AND h."timestamp" < $5::timestamptz  -- prunes months
     GROUP BY s.vehicle_id
),
meter_ids AS (
    SELECT vehicle_id, array_agg(meter_id ORDER BY first_used) AS ids
      FROM (SELECT vehicle_id, meter_id, min(lo) AS first_used FROM spans GROUP BY 1, 2) u
     GROUP BY vehicle_id
),
totals AS (
    SELECT v.vehicle_id, i.ids AS meter_ids, v.dc, true AS linked, m.ac
      FROM vehicle v
      JOIN meter m USING (vehicle_id)
      JOIN meter_ids i USING (vehicle_id)
),
{_CLASSIFIED}
SELECT vehicle_id, meter_ids, round(dc, 3) AS dc, round(ac, 3) AS ac, ratio, status
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
