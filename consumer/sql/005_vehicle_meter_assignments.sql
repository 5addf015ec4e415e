-- Which meter (charger) a vehicle charges at, over time. Intervals are half-open
-- [valid_from, valid_to); valid_to NULL means "until further notice". A vehicle
-- has at most one meter at any instant: enforced by a trigger rather than an
-- exclusion constraint, which would need the btree_gist extension (not on every
-- managed or embedded PostgreSQL).

CREATE TABLE vehicle_meter_assignments (
    vehicle_id text        NOT NULL,
    meter_id   text        NOT NULL,
    valid_from timestamptz NOT NULL,
    valid_to   timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (vehicle_id, valid_from),
    CHECK (valid_to IS NULL OR valid_to > valid_from)
);

CREATE INDEX vehicle_meter_assignments_meter ON vehicle_meter_assignments (meter_id, valid_from);

CREATE FUNCTION fleet_assignments_do_not_overlap() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Serialise writers per vehicle so two concurrent inserts cannot both pass the check.
    PERFORM pg_advisory_xact_lock(hashtext('vehicle_meter_assignments'), hashtext(NEW.vehicle_id));
    IF EXISTS (
        SELECT 1 FROM vehicle_meter_assignments a
         WHERE a.vehicle_id = NEW.vehicle_id
           AND (TG_OP = 'INSERT' OR a.valid_from <> OLD.valid_from)  -- not the row itself
           AND tstzrange(a.valid_from, a.valid_to) && tstzrange(NEW.valid_from, NEW.valid_to))
    THEN
        RAISE EXCEPTION 'vehicle % already has a meter between % and %',
              NEW.vehicle_id, NEW.valid_from, coalesce(NEW.valid_to::text, 'further notice')
              USING ERRCODE = 'exclusion_violation';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER vehicle_meter_assignments_do_not_overlap
    BEFORE INSERT OR UPDATE ON vehicle_meter_assignments
    FOR EACH ROW EXECUTE FUNCTION fleet_assignments_do_not_overlap();
