-- Charging sessions, derived from history by the sessions worker (consumer/sessions.py).
--
-- History stays the source of truth: a session row is a cache of what history says, and
-- can be dropped and recomputed at any time. The batch transaction only marks what
-- changed (session_marks, meter_marks: per device, the earliest reading of the batch);
-- the worker takes the marks, recomputes the touched sessions and deletes the marks it
-- took, in one transaction.

CREATE TABLE charging_sessions (
    session_id       uuid          PRIMARY KEY,  -- uuid5(vehicle id, started_at): the same on recomputation
    vehicle_id       text          NOT NULL,
    meter_id         text,                       -- the vehicle's meter when the session started
    started_at       timestamptz   NOT NULL,
    ended_at         timestamptz   NOT NULL,
    state            text          NOT NULL CHECK (state IN ('open', 'closed')),
    kwh_delivered_dc numeric(12,3) NOT NULL,
    kwh_consumed_ac  numeric(12,3),              -- NULL: no meter known
    efficiency_ratio numeric(8,4),
    status           text          NOT NULL,
    soc_start        numeric(5,2)  NOT NULL,
    soc_end          numeric(5,2)  NOT NULL,
    max_battery_temp numeric(5,2)  NOT NULL,
    readings         int           NOT NULL,
    updated_at       timestamptz   NOT NULL DEFAULT now(),
    UNIQUE (vehicle_id, started_at)
);

CREATE INDEX charging_sessions_meter ON charging_sessions (meter_id, started_at);
CREATE INDEX charging_sessions_open ON charging_sessions (ended_at) WHERE state = 'open';

-- A queue, appended to by every batch and emptied by the worker: one row per device per
-- batch, the earliest of its readings in that batch. Append-only, so a batch never waits
-- for the worker (nor the worker for a batch), and the worker deletes exactly the rows it
-- read: a row committed meanwhile is left for its next cycle.
CREATE TABLE session_marks (
    id         bigserial   PRIMARY KEY,
    vehicle_id text        NOT NULL,
    since      timestamptz NOT NULL
);

CREATE TABLE meter_marks (
    id       bigserial   PRIMARY KEY,
    meter_id text        NOT NULL,
    since    timestamptz NOT NULL
);

-- Each partition's progress in event time (its newest reading so far): the sessions
-- worker's watermark is the slowest active partition's, so a partition that lags behind
-- in a backfill does not make its devices look silent or close their sessions early.
ALTER TABLE consumer_offsets ADD COLUMN newest_event timestamptz;

-- fleet_write_batch as in 006, plus each partition's newest event time (o_newest) and the
-- marks (after steps 2 and 3 of each kind).
DROP FUNCTION fleet_write_batch(
    text, text[], int[], bigint[], bigint[], bigint[],
    text[], float8[], float8[], timestamptz[],
    text[], float8[], float8[], float8[], timestamptz[],
    text[], int[], bigint[], bytea[], bytea[], text[], text[]);

CREATE FUNCTION fleet_write_batch(
    p_group text,
    o_topic text[], o_partition int[], o_first bigint[], o_next bigint[], o_fence bigint[],
    o_newest timestamptz[],
    m_id text[], m_kwh float8[], m_voltage float8[], m_ts timestamptz[],
    v_id text[], v_soc float8[], v_kwh float8[], v_temp float8[], v_ts timestamptz[],
    d_topic text[], d_partition int[], d_offset bigint[], d_key bytea[], d_payload bytea[],
    d_reason text[], d_detail text[],
    OUT fenced text[],
    OUT meters_stored int, OUT meters_live int,
    OUT vehicles_stored int, OUT vehicles_live int
) LANGUAGE plpgsql AS $$
BEGIN
    meters_stored := 0; meters_live := 0; vehicles_stored := 0; vehicles_live := 0;

    IF cardinality(o_topic) > 0 THEN
        PERFORM 1 FROM consumer_offsets o
          JOIN unnest(o_topic, o_partition) AS b(topic, part)
            ON o.group_id = p_group AND o.topic = b.topic AND o."partition" = b.part
         ORDER BY o.topic, o."partition"
           FOR UPDATE OF o;
        SELECT array_agg(b.topic || '/' || b.part) INTO fenced
          FROM unnest(o_topic, o_partition, o_first, o_fence) AS b(topic, part, first, fence)
          LEFT JOIN consumer_offsets o
            ON o.group_id = p_group AND o.topic = b.topic AND o."partition" = b.part
         WHERE o.fence IS DISTINCT FROM b.fence OR coalesce(o.next_offset, 0) > b.first;
        IF fenced IS NOT NULL THEN
            RETURN;
        END IF;
        UPDATE consumer_offsets o
           SET next_offset = b.next, updated_at = now(),
               newest_event = greatest(o.newest_event, b.newest)
          FROM unnest(o_topic, o_partition, o_next, o_newest) AS b(topic, part, next, newest)
         WHERE o.group_id = p_group AND o.topic = b.topic AND o."partition" = b.part;
    END IF;

    IF cardinality(m_id) > 0 THEN
        INSERT INTO meter_history (meter_id, kwh_consumed_ac, voltage, "timestamp")
        SELECT * FROM unnest(m_id, m_kwh, m_voltage, m_ts)
        ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS meters_stored = ROW_COUNT;

        INSERT INTO meter_live (meter_id, kwh_consumed_ac, voltage, "timestamp")
        SELECT DISTINCT ON (id) id, kwh, volts, ts
          FROM unnest(m_id, m_kwh, m_voltage, m_ts) WITH ORDINALITY AS r(id, kwh, volts, ts, seq)
         ORDER BY id, ts DESC, seq
        ON CONFLICT (meter_id) DO UPDATE
           SET kwh_consumed_ac = EXCLUDED.kwh_consumed_ac, voltage = EXCLUDED.voltage,
               "timestamp" = EXCLUDED."timestamp", updated_at = now()
         WHERE meter_live."timestamp" < EXCLUDED."timestamp";
        GET DIAGNOSTICS meters_live = ROW_COUNT;

        INSERT INTO meter_marks (meter_id, since)
        SELECT id, min(ts) FROM unnest(m_id, m_ts) AS r(id, ts) GROUP BY id;
    END IF;

    IF cardinality(v_id) > 0 THEN
        INSERT INTO vehicle_history (vehicle_id, soc, kwh_delivered_dc, battery_temp, "timestamp")
        SELECT * FROM unnest(v_id, v_soc, v_kwh, v_temp, v_ts)
        ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS vehicles_stored = ROW_COUNT;

        INSERT INTO vehicle_live (vehicle_id, soc, kwh_delivered_dc, battery_temp, "timestamp")
        SELECT DISTINCT ON (id) id, soc, kwh, temp, ts
          FROM unnest(v_id, v_soc, v_kwh, v_temp, v_ts) WITH ORDINALITY AS r(id, soc, kwh, temp, ts, seq)
         ORDER BY id, ts DESC, seq
        ON CONFLICT (vehicle_id) DO UPDATE
           SET soc = EXCLUDED.soc, kwh_delivered_dc = EXCLUDED.kwh_delivered_dc,
               battery_temp = EXCLUDED.battery_temp, "timestamp" = EXCLUDED."timestamp",
               updated_at = now()
         WHERE vehicle_live."timestamp" < EXCLUDED."timestamp";
        GET DIAGNOSTICS vehicles_live = ROW_COUNT;

        -- Every reading: the delivering ones make sessions, and all of them carry the
        -- battery temperature the overheat alert watches.
        INSERT INTO session_marks (vehicle_id, since)
        SELECT id, min(ts) FROM unnest(v_id, v_ts) AS r(id, ts) GROUP BY id;
    END IF;

    IF cardinality(d_topic) > 0 THEN
        INSERT INTO dead_letters (topic, "partition", "offset", message_key, payload, reason, detail)
        SELECT * FROM unnest(d_topic, d_partition, d_offset, d_key, d_payload, d_reason, d_detail);
    END IF;
END $$;

-- The sessions worker's watermark: how far the group has read in event time, as its
-- slowest partition committed to in the last minute (an idle partition must not hold
-- everyone back; once all are idle, the newest), never ahead of the wall clock (a device
-- whose clock runs fast cannot move it). A function, so a statement that compares
-- readings with it sees both in one snapshot.
CREATE FUNCTION fleet_watermark(p_group text) RETURNS timestamptz LANGUAGE sql STABLE AS $$
    SELECT least(coalesce(min(newest_event) FILTER (WHERE updated_at > now() - interval '1 minute'),
                          max(newest_event)),
                 now())
      FROM consumer_offsets
     WHERE group_id = p_group AND newest_event IS NOT NULL
$$;

REVOKE EXECUTE ON FUNCTION fleet_write_batch FROM PUBLIC;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_writer') THEN
        GRANT EXECUTE ON FUNCTION fleet_write_batch TO fleet_writer;
    END IF;
END $$;

-- The same rating as the performance endpoint (consumer/api/analytics_sql.py).
CREATE FUNCTION fleet_efficiency_status(
    linked boolean, ac numeric, ratio numeric, min_ac numeric, fault_below numeric, anomalous_above numeric
) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
               WHEN NOT linked THEN 'unlinked'
               WHEN ac = 0 OR ac < min_ac THEN 'insufficient_data'
               WHEN ratio < fault_below THEN 'fault'
               WHEN ratio > anomalous_above THEN 'anomalous'
               ELSE 'normal'
           END
$$;

-- Recompute the sessions of these vehicles from the earliest session a reading at `since`
-- can touch (one ending within the gap before it, or any later one) to their newest
-- reading. A session is an island of delivering readings (kwh_delivered_dc > 0) no more
-- than p_gap apart; closed once the watermark is more than p_gap past its last reading.
-- Its AC side is its meter's energy over [started_at, ended_at] (each meter reading
-- carries the energy of the interval that ends at its timestamp). Returns the meters
-- whose sessions were rewritten.
CREATE FUNCTION fleet_sessionize(
    p_vehicles text[], p_since timestamptz[], p_gap interval, p_watermark timestamptz,
    p_min_ac numeric, p_fault_below numeric, p_anomalous_above numeric
) RETURNS TABLE (meter_id text) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_ids text[];
    v_from timestamptz[];
BEGIN
    SELECT array_agg(m.vid), array_agg(least(m.since, coalesce(
               (SELECT min(s.started_at) FROM charging_sessions s
                 WHERE s.vehicle_id = m.vid AND s.ended_at >= m.since - p_gap), m.since)))
      INTO v_ids, v_from
      FROM unnest(p_vehicles, p_since) AS m(vid, since);

    DELETE FROM charging_sessions s
     USING unnest(v_ids, v_from) AS r(vid, r0)
     WHERE s.vehicle_id = r.vid AND s.started_at >= r.r0;

    RETURN QUERY
    WITH delivering AS (
        SELECT h.vehicle_id, h."timestamp" AS ts, h.soc, h.kwh_delivered_dc AS dc, h.battery_temp AS temp,
               h."timestamp" - lag(h."timestamp") OVER w AS after_previous
          FROM unnest(v_ids, v_from) AS r(vid, r0)
          JOIN vehicle_history h ON h.vehicle_id = r.vid AND h."timestamp" >= r.r0
         WHERE h.kwh_delivered_dc > 0
        WINDOW w AS (PARTITION BY h.vehicle_id ORDER BY h."timestamp")
    ),
    islands AS (
        SELECT d.*, count(*) FILTER (WHERE d.after_previous IS NULL OR d.after_previous > p_gap)
                    OVER (PARTITION BY d.vehicle_id ORDER BY d.ts) AS island
          FROM delivering d
    ),
    sessions AS (
        SELECT i.vehicle_id, min(i.ts) AS started_at, max(i.ts) AS ended_at, sum(i.dc) AS dc,
               (array_agg(i.soc ORDER BY i.ts))[1] AS soc_start,
               (array_agg(i.soc ORDER BY i.ts DESC))[1] AS soc_end,
               max(i.temp) AS max_temp, count(*)::int AS readings
          FROM islands i
         GROUP BY i.vehicle_id, i.island
    ),
    metered AS (
        SELECT s.*, a.meter_id,
               CASE WHEN a.meter_id IS NOT NULL THEN coalesce(
                   (SELECT sum(h.kwh_consumed_ac) FROM meter_history h
                     WHERE h.meter_id = a.meter_id
                       AND h."timestamp" >= s.started_at AND h."timestamp" <= s.ended_at), 0)
               END AS ac
          FROM sessions s
          LEFT JOIN LATERAL (
                SELECT v.meter_id FROM vehicle_meter_assignments v
                 WHERE v.vehicle_id = s.vehicle_id AND v.valid_from <= s.started_at
                   AND (v.valid_to IS NULL OR v.valid_to > s.started_at)) a ON true
    ),
    rated AS (
        SELECT m.*, CASE WHEN m.ac > 0 THEN round(m.dc / m.ac, 4) END AS ratio FROM metered m
    ),
    written AS (
        INSERT INTO charging_sessions AS c (
            session_id, vehicle_id, meter_id, started_at, ended_at, state,
            kwh_delivered_dc, kwh_consumed_ac, efficiency_ratio, status,
            soc_start, soc_end, max_battery_temp, readings)
        SELECT md5(r.vehicle_id || '|' || extract(epoch FROM r.started_at)::text)::uuid,
               r.vehicle_id, r.meter_id, r.started_at, r.ended_at,
               CASE WHEN p_watermark - r.ended_at > p_gap THEN 'closed' ELSE 'open' END,
               r.dc, r.ac, r.ratio,
               fleet_efficiency_status(r.meter_id IS NOT NULL, r.ac, r.ratio,
                                       p_min_ac, p_fault_below, p_anomalous_above),
               r.soc_start, r.soc_end, r.max_temp, r.readings
          FROM rated r
        RETURNING c.meter_id
    )
    SELECT DISTINCT w.meter_id FROM written w WHERE w.meter_id IS NOT NULL;
END $$;

-- A meter's late readings: recount the AC side of its sessions that end at or after them.
CREATE FUNCTION fleet_recount_sessions(
    p_meters text[], p_since timestamptz[],
    p_min_ac numeric, p_fault_below numeric, p_anomalous_above numeric
) RETURNS TABLE (meter_id text) LANGUAGE sql AS $$
    WITH recount AS (
        SELECT s.session_id, s.kwh_delivered_dc AS dc,
               coalesce((SELECT sum(h.kwh_consumed_ac) FROM meter_history h
                          WHERE h.meter_id = s.meter_id
                            AND h."timestamp" >= s.started_at AND h."timestamp" <= s.ended_at), 0) AS ac
          FROM unnest(p_meters, p_since) AS m(mid, since)
          JOIN charging_sessions s ON s.meter_id = m.mid AND s.ended_at >= m.since
    ),
    changed AS (
        UPDATE charging_sessions c
           SET kwh_consumed_ac = r.ac,
               efficiency_ratio = CASE WHEN r.ac > 0 THEN round(r.dc / r.ac, 4) END,
               status = fleet_efficiency_status(true, r.ac, CASE WHEN r.ac > 0 THEN round(r.dc / r.ac, 4) END,
                                                p_min_ac, p_fault_below, p_anomalous_above),
               updated_at = now()
          FROM recount r
         WHERE c.session_id = r.session_id AND c.kwh_consumed_ac IS DISTINCT FROM r.ac
        RETURNING c.meter_id
    )
    SELECT DISTINCT meter_id FROM changed
$$;
