-- Hourly totals per device: what the fleet report reads instead of history.
--
-- A fleet report over 24 h of 10,000 vehicles read millions of history rows per page. These
-- tables hold, per device and UTC hour with readings, that hour's energy (in Wh: readings carry
-- kWh to three decimals, so these are exact integers) and reading count, and the device's
-- running totals through the end of that hour. A window's total is then a
-- difference of two running totals: the report reads two rows per device whatever the
-- window's length or history's size.
--
-- History stays the source of truth: the sessions worker recomputes a device's rows from
-- history, from the hour of the earliest reading a batch brought for it (its mark, sql/013)
-- onwards, on top of its running totals before that hour. A late reading recomputes its
-- hour and the running totals after it, a re-sent one recomputes to the same rows, and the
-- tables can be emptied and rebuilt with fleet_refresh_hourly(every device, '-infinity').

CREATE TABLE vehicle_hourly (
    vehicle_id       text        NOT NULL,
    hour             timestamptz NOT NULL,
    wh_delivered_dc  bigint      NOT NULL,
    readings         int         NOT NULL,
    through_wh       bigint      NOT NULL,  -- running totals through the end of this hour
    through_readings bigint      NOT NULL,
    PRIMARY KEY (vehicle_id, hour) INCLUDE (through_wh, through_readings)
);

CREATE TABLE meter_hourly (
    meter_id         text        NOT NULL,
    hour             timestamptz NOT NULL,
    wh_consumed_ac   bigint      NOT NULL,
    readings         int         NOT NULL,
    through_wh       bigint      NOT NULL,
    through_readings bigint      NOT NULL,
    PRIMARY KEY (meter_id, hour) INCLUDE (through_wh, through_readings)
);

-- The report reads every device's row of one hour: index-only scans of these.
CREATE INDEX vehicle_hourly_by_hour ON vehicle_hourly (hour)
    INCLUDE (vehicle_id, through_wh, through_readings);
CREATE INDEX meter_hourly_by_hour ON meter_hourly (hour) INCLUDE (meter_id, through_wh);

-- The UTC hour a reading belongs to, whatever the session's TimeZone.
CREATE FUNCTION fleet_hour(ts timestamptz) RETURNS timestamptz LANGUAGE sql IMMUTABLE AS $$
    SELECT date_bin('1 hour', ts, '2000-01-01 00:00:00+00')
$$;

-- Recompute these devices' rows from the hour of `since` onwards (the readings before it did
-- not change), on top of each one's running totals before that hour. Rows only ever grow:
-- history is append-only between retention drops.
CREATE FUNCTION fleet_refresh_hourly(
    p_vehicles text[], p_vehicle_since timestamptz[], p_meters text[], p_meter_since timestamptz[]
) RETURNS void LANGUAGE sql AS $$
    WITH d AS (
        SELECT d.id, fleet_hour(d.since) AS h0,
               coalesce(b.through_wh, 0) AS base_wh, coalesce(b.through_readings, 0) AS base_n
          FROM unnest(p_vehicles, p_vehicle_since) AS d(id, since)
          LEFT JOIN LATERAL (
                SELECT v.through_wh, v.through_readings FROM vehicle_hourly v
                 WHERE v.vehicle_id = d.id AND v.hour < fleet_hour(d.since)
                 ORDER BY v.hour DESC LIMIT 1) b ON true
    ),
    hours AS (
        SELECT h.vehicle_id, fleet_hour(h."timestamp") AS hour,
               (1000 * sum(h.kwh_delivered_dc))::bigint AS wh, count(*)::int AS n
          FROM d JOIN vehicle_history h ON h.vehicle_id = d.id AND h."timestamp" >= d.h0
         GROUP BY 1, 2
    )
    INSERT INTO vehicle_hourly AS t
           (vehicle_id, hour, wh_delivered_dc, readings, through_wh, through_readings)
    SELECT h.vehicle_id, h.hour, h.wh, h.n,
           d.base_wh + sum(h.wh) OVER w, d.base_n + sum(h.n) OVER w
      FROM hours h JOIN d ON d.id = h.vehicle_id
    WINDOW w AS (PARTITION BY h.vehicle_id ORDER BY h.hour)
    ON CONFLICT (vehicle_id, hour) DO UPDATE
       SET wh_delivered_dc = EXCLUDED.wh_delivered_dc, readings = EXCLUDED.readings,
           through_wh = EXCLUDED.through_wh, through_readings = EXCLUDED.through_readings
     WHERE t.through_readings <> EXCLUDED.through_readings
        OR t.through_wh <> EXCLUDED.through_wh OR t.readings <> EXCLUDED.readings;

    WITH d AS (
        SELECT d.id, fleet_hour(d.since) AS h0,
               coalesce(b.through_wh, 0) AS base_wh, coalesce(b.through_readings, 0) AS base_n
          FROM unnest(p_meters, p_meter_since) AS d(id, since)
          LEFT JOIN LATERAL (
                SELECT m.through_wh, m.through_readings FROM meter_hourly m
                 WHERE m.meter_id = d.id AND m.hour < fleet_hour(d.since)
                 ORDER BY m.hour DESC LIMIT 1) b ON true
    ),
    hours AS (
        SELECT h.meter_id, fleet_hour(h."timestamp") AS hour,
               (1000 * sum(h.kwh_consumed_ac))::bigint AS wh, count(*)::int AS n
          FROM d JOIN meter_history h ON h.meter_id = d.id AND h."timestamp" >= d.h0
         GROUP BY 1, 2
    )
    INSERT INTO meter_hourly AS t
           (meter_id, hour, wh_consumed_ac, readings, through_wh, through_readings)
    SELECT h.meter_id, h.hour, h.wh, h.n,
           d.base_wh + sum(h.wh) OVER w, d.base_n + sum(h.n) OVER w
      FROM hours h JOIN d ON d.id = h.meter_id
    WINDOW w AS (PARTITION BY h.meter_id ORDER BY h.hour)
    ON CONFLICT (meter_id, hour) DO UPDATE
       SET wh_consumed_ac = EXCLUDED.wh_consumed_ac, readings = EXCLUDED.readings,
           through_wh = EXCLUDED.through_wh, through_readings = EXCLUDED.through_readings
     WHERE t.through_readings <> EXCLUDED.through_readings
        OR t.through_wh <> EXCLUDED.through_wh OR t.readings <> EXCLUDED.readings;
$$;

-- What history already holds. On a large history this reads all of it once: migrate in a
-- quiet hour (ingestion is not blocked; the totals it adds meanwhile are recomputed).
SELECT fleet_refresh_hourly(
    (SELECT coalesce(array_agg(DISTINCT vehicle_id), '{}') FROM vehicle_history),
    (SELECT coalesce(array_agg('-infinity'::timestamptz), '{}')
       FROM (SELECT DISTINCT vehicle_id FROM vehicle_history) v),
    (SELECT coalesce(array_agg(DISTINCT meter_id), '{}') FROM meter_history),
    (SELECT coalesce(array_agg('-infinity'::timestamptz), '{}')
       FROM (SELECT DISTINCT meter_id FROM meter_history) m));

-- Retention (sql/008) drops history, not these: the fleet report still answers for months
-- whose readings are gone (at a reading a minute, these are a sixtieth of history's rows).

REVOKE EXECUTE ON FUNCTION fleet_refresh_hourly FROM PUBLIC;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_sessions') THEN
        GRANT SELECT, INSERT, UPDATE ON vehicle_hourly, meter_hourly TO fleet_sessions;
        GRANT EXECUTE ON FUNCTION fleet_refresh_hourly TO fleet_sessions;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_reader') THEN
        GRANT SELECT ON vehicle_hourly, meter_hourly TO fleet_reader;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_api') THEN
        GRANT SELECT ON vehicle_hourly, meter_hourly TO fleet_api;
    END IF;
END $$;
