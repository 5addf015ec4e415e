-- History (cold store): every valid reading, append-only, partitioned by month.
-- The unique index is both the (device, timestamp) lookup index and what makes a
-- re-sent reading (same device, same timestamp) land once.

CREATE TABLE meter_history (
    meter_id        text          NOT NULL,
    kwh_consumed_ac numeric(10,3) NOT NULL CHECK (kwh_consumed_ac >= 0),
    voltage         numeric(8,2)  NOT NULL CHECK (voltage >= 0 AND voltage <= 100000),
    "timestamp"     timestamptz   NOT NULL,
    ingested_at     timestamptz   NOT NULL DEFAULT now()
) PARTITION BY RANGE ("timestamp");

CREATE TABLE vehicle_history (
    vehicle_id       text          NOT NULL,
    soc              numeric(5,2)  NOT NULL CHECK (soc >= 0 AND soc <= 100),
    kwh_delivered_dc numeric(10,3) NOT NULL CHECK (kwh_delivered_dc >= 0),
    battery_temp     numeric(5,2)  NOT NULL CHECK (battery_temp >= -50 AND battery_temp <= 150),
    "timestamp"      timestamptz   NOT NULL,
    ingested_at      timestamptz   NOT NULL DEFAULT now()
) PARTITION BY RANGE ("timestamp");

CREATE UNIQUE INDEX meter_history_device_ts ON meter_history (meter_id, "timestamp");
CREATE INDEX meter_history_ts ON meter_history ("timestamp");
CREATE UNIQUE INDEX vehicle_history_device_ts ON vehicle_history (vehicle_id, "timestamp");
CREATE INDEX vehicle_history_ts ON vehicle_history ("timestamp");

-- Readings outside every prepared month land here rather than being lost.
CREATE TABLE meter_history_default PARTITION OF meter_history DEFAULT;
CREATE TABLE vehicle_history_default PARTITION OF vehicle_history DEFAULT;

-- Create the monthly partition holding `month` for one history table, moving any
-- rows the default partition already holds for that month into it (attaching a
-- range that the default partition overlaps would otherwise fail).
CREATE FUNCTION fleet_create_history_partition(parent regclass, month date)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    lower_bound timestamptz := date_trunc('month', month::timestamp) AT TIME ZONE 'UTC';
    upper_bound timestamptz := (date_trunc('month', month::timestamp) + interval '1 month') AT TIME ZONE 'UTC';
    base text := parent::text;
    part text := format('%s_y%sm%s', base, to_char(month, 'YYYY'), to_char(month, 'MM'));
BEGIN
    IF to_regclass(part) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE %s INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part, base);
    EXECUTE format(
        'WITH moved AS (DELETE FROM %I WHERE "timestamp" >= %L AND "timestamp" < %L RETURNING *)
         INSERT INTO %I SELECT * FROM moved',
        base || '_default', lower_bound, upper_bound, part);
    EXECUTE format('ALTER TABLE %s ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   base, part, lower_bound, upper_bound);
    RETURN true;
END $$;

-- Prepare monthly partitions of both history tables around now(); safe to call
-- from several processes at once (they queue on one advisory lock).
CREATE FUNCTION fleet_prepare_history_partitions(months_back int, months_ahead int)
RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    created int := 0;
    m date;
    t regclass;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('fleet_prepare_history_partitions'));
    FOR m IN
        SELECT generate_series(date_trunc('month', now() AT TIME ZONE 'UTC') - make_interval(months => months_back),
                               date_trunc('month', now() AT TIME ZONE 'UTC') + make_interval(months => months_ahead),
                               interval '1 month')::date
    LOOP
        FOREACH t IN ARRAY ARRAY['meter_history'::regclass, 'vehicle_history'::regclass] LOOP
            IF fleet_create_history_partition(t, m) THEN
                created := created + 1;
            END IF;
        END LOOP;
    END LOOP;
    RETURN created;
END $$;

SELECT fleet_prepare_history_partitions(3, 3);
