-- Which meter (charger) a vehicle charges at, over time. Intervals are half-open
-- [valid_from, valid_to); valid_to NULL means "until further notice". A vehicle
-- has at most one meter at any instant.

CREATE EXTENSION IF NOT EXISTS btree_gist;

CREATE TABLE vehicle_meter_assignments (
    vehicle_id text        NOT NULL,
    meter_id   text        NOT NULL,
    valid_from timestamptz NOT NULL,
    valid_to   timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (vehicle_id, valid_from),
    CHECK (valid_to IS NULL OR valid_to > valid_from),
    EXCLUDE USING gist (vehicle_id WITH =, tstzrange(valid_from, valid_to) WITH &&)
);

CREATE INDEX vehicle_meter_assignments_meter ON vehicle_meter_assignments (meter_id, valid_from);
