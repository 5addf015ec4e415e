-- Alerts: at most one unresolved alert per (kind, subject), every transition kept with
-- its evidence. alert_transitions is also the transactional outbox: a transition commits
-- with what caused it (a sessions-worker cycle, an acknowledgement), and the publisher
-- sends the unpublished ones to the alerts topic in order and stamps published_at; a send
-- repeated after a crash carries the same transition_id.

CREATE TABLE alerts (
    alert_id        uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    kind            text        NOT NULL,
    subject         text        NOT NULL,  -- a meter id or a vehicle id
    state           text        NOT NULL CHECK (state IN ('open', 'acknowledged', 'resolved')),
    opened_at       timestamptz NOT NULL,  -- event time of the evidence
    acknowledged_at timestamptz,
    resolved_at     timestamptz,
    evidence        jsonb       NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE UNIQUE INDEX alerts_one_unresolved ON alerts (kind, subject) WHERE state <> 'resolved';
CREATE INDEX alerts_by_subject ON alerts (subject, opened_at);

CREATE TABLE alert_transitions (
    seq           bigserial   PRIMARY KEY,  -- the order they are published in
    transition_id uuid        NOT NULL UNIQUE DEFAULT gen_random_uuid(),
    alert_id      uuid        NOT NULL REFERENCES alerts,
    state         text        NOT NULL,
    at            timestamptz NOT NULL,     -- event time (an acknowledgement: the wall clock)
    evidence      jsonb       NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);

CREATE INDEX alert_transitions_unpublished ON alert_transitions (seq) WHERE published_at IS NULL;
CREATE INDEX alert_transitions_alert ON alert_transitions (alert_id, seq);

-- Charger health, kept by the sessions worker whenever a meter's sessions change: the
-- average efficiency of its last FLEET_ALERT_SESSIONS closed, rated sessions (NULL while
-- it has fewer), so the health endpoint pages an index instead of scanning sessions.
CREATE TABLE charger_health (
    meter_id   text         PRIMARY KEY,
    average    numeric(8,4),
    sessions   int          NOT NULL,
    status     text         NOT NULL,
    last_session_at timestamptz,
    updated_at timestamptz  NOT NULL DEFAULT now()
);

CREATE INDEX charger_health_worst_first ON charger_health (average NULLS LAST, meter_id);

-- Who may do what (the roles of sql/009 and sql/007, where they exist; fleet_sessions is
-- the sessions worker's: it reads history and keeps sessions, marks and alerts).
REVOKE EXECUTE ON FUNCTION fleet_sessionize, fleet_recount_sessions FROM PUBLIC;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_sessions') THEN
        BEGIN
            CREATE ROLE fleet_sessions NOLOGIN;
        EXCEPTION
            WHEN insufficient_privilege THEN
                RAISE NOTICE 'fleet_sessions not created: %', SQLERRM;
            WHEN duplicate_object OR unique_violation THEN
                NULL;
        END;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_sessions') THEN
        GRANT USAGE ON SCHEMA public TO fleet_sessions;
        GRANT SELECT ON meter_history, vehicle_history, meter_live, vehicle_live,
                        vehicle_meter_assignments, consumer_offsets TO fleet_sessions;
        GRANT SELECT, INSERT, UPDATE, DELETE ON charging_sessions, session_marks, meter_marks,
                        alerts, alert_transitions, charger_health TO fleet_sessions;
        GRANT USAGE ON SEQUENCE alert_transitions_seq_seq TO fleet_sessions;
        GRANT EXECUTE ON FUNCTION fleet_sessionize, fleet_recount_sessions TO fleet_sessions;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_writer') THEN
        -- The batch's marks: appended, never read.
        GRANT INSERT ON session_marks, meter_marks TO fleet_writer;
        GRANT USAGE ON SEQUENCE session_marks_id_seq, meter_marks_id_seq TO fleet_writer;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_reader') THEN
        GRANT SELECT ON charging_sessions, alerts, alert_transitions, charger_health TO fleet_reader;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_api') THEN
        GRANT SELECT ON charging_sessions, alerts, alert_transitions, charger_health TO fleet_api;
        GRANT UPDATE ON alerts TO fleet_api;  -- acknowledgements
        GRANT INSERT ON alert_transitions TO fleet_api;
        GRANT USAGE ON SEQUENCE alert_transitions_seq_seq TO fleet_api;
    END IF;
END $$;
