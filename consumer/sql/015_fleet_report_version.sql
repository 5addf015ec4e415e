-- A counter of changes to what the fleet report is computed from: the hourly totals
-- (sql/014) and the meter assignments. The API keeps a window's ranking between pages
-- (consumer/api/fleet_rankings.py) and serves from it while this number is unchanged; it
-- is bumped in the transaction of the change, so a ranking is never served past it.

CREATE TABLE fleet_report_version (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),  -- a single row
    version bigint  NOT NULL
);
INSERT INTO fleet_report_version VALUES (true, 0);

-- Statement triggers that bump only when rows changed: the sessions worker refreshes the
-- totals every cycle, usually with nothing new, and an idle fleet keeps its cached rankings.
-- SECURITY DEFINER: whoever changes the inputs (the worker, the API, migrate) bumps the
-- counter without holding UPDATE on it.
CREATE FUNCTION fleet_report_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM changed) THEN
        UPDATE fleet_report_version SET version = version + 1;
    END IF;
    RETURN NULL;
END $$;
REVOKE EXECUTE ON FUNCTION fleet_report_changed FROM PUBLIC;

-- A transition table names one event per trigger, hence three per table.
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['vehicle_hourly', 'meter_hourly', 'vehicle_meter_assignments'] LOOP
        EXECUTE format('CREATE TRIGGER %I AFTER INSERT ON %I REFERENCING NEW TABLE AS changed '
                       'FOR EACH STATEMENT EXECUTE FUNCTION fleet_report_changed()', t || '_inserted', t);
        EXECUTE format('CREATE TRIGGER %I AFTER UPDATE ON %I REFERENCING NEW TABLE AS changed '
                       'FOR EACH STATEMENT EXECUTE FUNCTION fleet_report_changed()', t || '_updated', t);
        EXECUTE format('CREATE TRIGGER %I AFTER DELETE ON %I REFERENCING OLD TABLE AS changed '
                       'FOR EACH STATEMENT EXECUTE FUNCTION fleet_report_changed()', t || '_deleted', t);
    END LOOP;
END $$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_reader') THEN
        GRANT SELECT ON fleet_report_version TO fleet_reader;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_api') THEN
        GRANT SELECT ON fleet_report_version TO fleet_api;
    END IF;
END $$;
