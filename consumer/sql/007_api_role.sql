-- A role for the HTTP API: it reads everything it serves and writes only the
-- vehicle->meter assignments. NOLOGIN: operators grant it to a login of theirs
-- (GRANT fleet_api TO my_api_login) and point FLEET_API_DATABASE_URL at that login.
-- Where the migrating user may not create roles (some managed services), this is
-- skipped with a notice and the operator creates it with the same grants.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_api') THEN
        BEGIN
            CREATE ROLE fleet_api NOLOGIN;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'fleet_api not created: %', SQLERRM;
            RETURN;
        END;
    END IF;
    GRANT USAGE ON SCHEMA public TO fleet_api;
    GRANT SELECT ON meter_history, vehicle_history, meter_live, vehicle_live,
                    vehicle_meter_assignments, dead_letters TO fleet_api;
    GRANT INSERT, UPDATE ON vehicle_meter_assignments TO fleet_api;
END $$;
