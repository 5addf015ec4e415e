-- Retention: history older than a cutoff goes a whole monthly partition at a time
-- (DROP TABLE, no row-by-row DELETE, no bloat). A month is dropped only once all
-- of it is older than the cutoff. The default partition is never dropped: what
-- lands there is watched (fleet_history_default_rows) and moved out by
-- fleet_create_history_partition when its month is prepared.

CREATE FUNCTION fleet_drop_history_partitions(cutoff timestamptz)
RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    dropped text[] := '{}';
    part record;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('fleet_prepare_history_partitions'));
    FOR part IN
        SELECT c.relname,
               (make_date(substring(c.relname from '_y(\d{4})m\d{2}$')::int,
                          substring(c.relname from '_y\d{4}m(\d{2})$')::int, 1)
                + interval '1 month') AT TIME ZONE 'UTC' AS month_end
          FROM pg_inherits i
          JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent IN ('meter_history'::regclass, 'vehicle_history'::regclass)
           AND c.relname ~ '_y\d{4}m\d{2}$'
         ORDER BY c.relname
    LOOP
        IF part.month_end <= cutoff THEN
            EXECUTE format('DROP TABLE %I', part.relname);
            dropped := dropped || part.relname::text;
        END IF;
    END LOOP;
    RETURN dropped;
END $$;

-- Rows outside every prepared month, per history table (should stay near zero).
CREATE FUNCTION fleet_history_default_rows(OUT meter_rows bigint, OUT vehicle_rows bigint)
LANGUAGE sql STABLE AS $$
    SELECT (SELECT count(*) FROM meter_history_default),
           (SELECT count(*) FROM vehicle_history_default)
$$;
