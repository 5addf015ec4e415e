-- The live stream's change log (consumer/api/stream.py): which devices, alerts and sessions
-- a committed transaction changed, one row per kind per transaction, written by triggers in
-- that transaction, so only what commits is ever streamed.
--
-- Readers follow it by snapshot, not by a sequence (a sequence number is taken before its
-- transaction commits, so a later number can become visible first): the rows a reader has
-- not seen are those visible in its new snapshot and not in its previous one
-- (pg_visible_in_snapshot), so a transaction that commits late is read late, never missed,
-- and holds back nobody else. It works the same on a streaming replica (no NOTIFY there).
-- The rows name ids only; readers take the rows themselves from the live tables, alerts
-- and sessions.

CREATE TABLE stream_changes (
    xid  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    at   timestamptz NOT NULL DEFAULT now(),  -- the transaction's now(): the live rows' updated_at
    kind text        NOT NULL CHECK (kind IN ('vehicle', 'meter', 'alert', 'session')),
    ids  text[]      NOT NULL
);
CREATE INDEX stream_changes_by_xid ON stream_changes (xid);

-- The newest transaction id pruned (consumer/stream_pruning.py): a reader resuming from a
-- snapshot whose xmin is at or below it may have missed changes, and is told to start over.
CREATE TABLE stream_horizon (
    one        boolean PRIMARY KEY DEFAULT true CHECK (one),
    pruned_xid xid8    NOT NULL
);
INSERT INTO stream_horizon VALUES (true, '0');

-- Ingestion: a batch's mark row (sql/013) already names its devices.
CREATE FUNCTION fleet_stream_batch() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    IF cardinality(NEW.vehicle_ids) > 0 THEN
        INSERT INTO stream_changes (kind, ids) VALUES ('vehicle', NEW.vehicle_ids);
    END IF;
    IF cardinality(NEW.meter_ids) > 0 THEN
        INSERT INTO stream_changes (kind, ids) VALUES ('meter', NEW.meter_ids);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER batch_marks_streamed AFTER INSERT ON batch_marks
    FOR EACH ROW EXECUTE FUNCTION fleet_stream_batch();

-- Alerts (every transition, acknowledgements included) and sessions, once per statement:
-- TG_ARGV names the kind and the changed rows' id column.
CREATE FUNCTION fleet_stream_statement() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    EXECUTE format('INSERT INTO stream_changes (kind, ids) '
                   'SELECT $1, array_agg(DISTINCT %I::text) FROM changed HAVING count(*) > 0',
                   TG_ARGV[1])
      USING TG_ARGV[0];
    RETURN NULL;
END $$;
CREATE TRIGGER alert_transitions_streamed AFTER INSERT ON alert_transitions
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT
    EXECUTE FUNCTION fleet_stream_statement('alert', 'alert_id');
-- A transition table names one event per trigger.
CREATE TRIGGER charging_sessions_inserted_streamed AFTER INSERT ON charging_sessions
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT
    EXECUTE FUNCTION fleet_stream_statement('session', 'session_id');
CREATE TRIGGER charging_sessions_updated_streamed AFTER UPDATE ON charging_sessions
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT
    EXECUTE FUNCTION fleet_stream_statement('session', 'session_id');

-- Pruning past the replay window: by the ingest role, as the owner.
CREATE FUNCTION fleet_prune_stream(p_keep interval) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp AS $$
    WITH gone AS (DELETE FROM stream_changes WHERE at < now() - p_keep RETURNING xid),
    horizon AS (
        UPDATE stream_horizon SET pruned_xid = greatest(pruned_xid, (SELECT max(xid) FROM gone))
         WHERE EXISTS (SELECT 1 FROM gone)
    )
    SELECT count(*) FROM gone
$$;

REVOKE EXECUTE ON FUNCTION fleet_stream_batch, fleet_stream_statement, fleet_prune_stream
    FROM PUBLIC;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_writer') THEN
        GRANT EXECUTE ON FUNCTION fleet_prune_stream TO fleet_writer;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_reader') THEN
        GRANT SELECT ON stream_changes, stream_horizon TO fleet_reader;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_api') THEN
        GRANT SELECT ON stream_changes, stream_horizon TO fleet_api;
    END IF;
END $$;
