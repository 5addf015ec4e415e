-- Least-privilege roles. Who is who, none of them a superuser:
--
--   migration owner  the login that runs `python -m consumer migrate`: a plain login
--                    (NOSUPERUSER) that owns the database, hence the schema public
--                    (pg_database_owner) and every object sql/ creates. CREATEROLE lets
--                    this file (and 007) create the group roles; without it an admin
--                    pre-creates them once (CREATE ROLE fleet_writer NOLOGIN; likewise
--                    fleet_reader, fleet_api) and migrate only grants. CREATEDB only if
--                    migrate should create a missing database. Run as a superuser (the
--                    local default) it works too, but the SECURITY DEFINER functions
--                    below then run as a superuser.
--   fleet_writer     the consumer (`run --role ingest`, FLEET_DATABASE_URL): appends
--                    history and dead letters, upserts live readings and its offsets,
--                    and maintains history partitions only through the owner's functions.
--                    It cannot read history, delete or update history or dead letters,
--                    touch meter assignments, or change the schema.
--   fleet_reader     the API on a read-only login (`run --role api`, FLEET_API_DATABASE_URL):
--                    reads what the API serves, writes nothing; a meter assignment PUT is
--                    answered 403 read_only.
--   fleet_api        (007) the API that also assigns meters: the same reads, plus SELECT on
--                    dead_letters and INSERT/UPDATE on vehicle_meter_assignments.
--
-- All are NOLOGIN groups: GRANT fleet_writer TO my_consumer_login. `run --role all` needs
-- both sides: FLEET_DATABASE_URL as a writer, FLEET_API_DATABASE_URL as a reader or fleet_api.
-- As in 007, a role the migrating user may not create is skipped with a notice, and one that
-- already exists (pre-created by an operator or an init script) is only granted to; this
-- file can be re-run as the owner (psql -f) to grant to roles created after migrating.

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['fleet_writer', 'fleet_reader'] LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r);
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
        EXCEPTION
            WHEN insufficient_privilege THEN
                RAISE NOTICE '% not created: %', r, SQLERRM;
            WHEN duplicate_object OR unique_violation THEN
                NULL;  -- roles are per server: a migration of another database made it first
        END;
    END LOOP;
END $$;

-- Nobody but the owner creates objects in public (PostgreSQL 15's default, made explicit):
-- the SECURITY DEFINER functions below resolve names there.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

-- Partition maintenance creates, attaches and drops tables, which takes ownership of the
-- history tables; the writer reaches it only through these entry points, run as the owner.
-- Their input is typed (int, timestamptz) and their dynamic SQL quotes with %I/%L.
-- search_path: pg_catalog is searched first implicitly, and named first it would become
-- where CREATE TABLE creates (refused); pg_temp last, so a caller's temporary table cannot
-- stand in for a history table.
ALTER FUNCTION fleet_prepare_history_partitions SECURITY DEFINER SET search_path = public, pg_temp;
ALTER FUNCTION fleet_drop_history_partitions SECURITY DEFINER SET search_path = public, pg_temp;
ALTER FUNCTION fleet_history_default_rows SECURITY DEFINER SET search_path = public, pg_temp;
REVOKE EXECUTE ON FUNCTION fleet_prepare_history_partitions, fleet_drop_history_partitions,
    fleet_history_default_rows, fleet_write_batch FROM PUBLIC;
-- Takes any table: for the owner, and for fleet_prepare_history_partitions (as the owner).
REVOKE EXECUTE ON FUNCTION fleet_create_history_partition FROM PUBLIC;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_writer') THEN
        RETURN;
    END IF;
    GRANT USAGE ON SCHEMA public TO fleet_writer;
    -- Append only: a re-sent reading is skipped by ON CONFLICT DO NOTHING, which reads nothing.
    GRANT INSERT ON meter_history, vehicle_history, dead_letters TO fleet_writer;
    -- ON CONFLICT DO UPDATE reads the conflict key, the WHERE guard and EXCLUDED's columns
    -- (nearly every column: hence SELECT on the table); claims read offsets and fences back.
    GRANT SELECT, INSERT, UPDATE ON meter_live, vehicle_live, consumer_offsets TO fleet_writer;
    GRANT EXECUTE ON FUNCTION fleet_write_batch, fleet_prepare_history_partitions,
        fleet_drop_history_partitions, fleet_history_default_rows TO fleet_writer;
END $$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_reader') THEN
        RETURN;
    END IF;
    GRANT USAGE ON SCHEMA public TO fleet_reader;
    GRANT SELECT ON meter_history, vehicle_history, meter_live, vehicle_live,
                    vehicle_meter_assignments TO fleet_reader;
END $$;
