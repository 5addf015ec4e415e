-- Marks as one row per batch instead of one row per device per batch.
--
-- 011 appended a row to session_marks or meter_marks for every device of every batch: as
-- many index entries as a third of the history rows themselves, and most of what sessions
-- cost the write path (BENCHMARKS.md). Here a batch appends a single row holding its
-- readings' keys as the arrays it was called with (device ids, timestamps, and the
-- vehicles' battery temperatures, which the overheat rule needs): no grouping, no per-device
-- index entry. The sessions worker groups them by device when it takes them, and deletes
-- exactly the rows it took (consumer/sessions.py).

CREATE TABLE batch_marks (
    id            bigserial     PRIMARY KEY,
    meter_ids     text[]        NOT NULL,
    meter_ts      timestamptz[] NOT NULL,
    vehicle_ids   text[]        NOT NULL,
    vehicle_ts    timestamptz[] NOT NULL,
    vehicle_temps numeric(5,2)[] NOT NULL  -- as history stores them: the rule compares these
);

-- What 011's tables still hold moves over, so no device misses its next recomputation.
INSERT INTO batch_marks (meter_ids, meter_ts, vehicle_ids, vehicle_ts, vehicle_temps)
SELECT coalesce((SELECT array_agg(meter_id) FROM meter_marks), '{}'),
       coalesce((SELECT array_agg(since) FROM meter_marks), '{}'),
       coalesce((SELECT array_agg(vehicle_id) FROM session_marks), '{}'),
       coalesce((SELECT array_agg(since) FROM session_marks), '{}'),
       -- 011 kept no temperatures: 150, the highest history accepts, makes the overheat
       -- rule read these vehicles' readings rather than skip them.
       coalesce((SELECT array_agg(150::numeric(5,2)) FROM session_marks), '{}')
 WHERE EXISTS (SELECT 1 FROM meter_marks) OR EXISTS (SELECT 1 FROM session_marks);

DROP TABLE session_marks, meter_marks;

-- fleet_write_batch as in 011, with the batch's mark as one row.
DROP FUNCTION fleet_write_batch(
    text, text[], int[], bigint[], bigint[], bigint[], timestamptz[],
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

    END IF;

    -- The batch's mark: its readings' keys as they came, one row (sql/013's header).
    IF cardinality(m_id) + cardinality(v_id) > 0 THEN
        INSERT INTO batch_marks (meter_ids, meter_ts, vehicle_ids, vehicle_ts, vehicle_temps)
        VALUES (m_id, m_ts, v_id, v_ts, v_temp::numeric(5,2)[]);
    END IF;

    IF cardinality(d_topic) > 0 THEN
        INSERT INTO dead_letters (topic, "partition", "offset", message_key, payload, reason, detail)
        SELECT * FROM unnest(d_topic, d_partition, d_offset, d_key, d_payload, d_reason, d_detail);
    END IF;
END $$;

REVOKE EXECUTE ON FUNCTION fleet_write_batch FROM PUBLIC;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_writer') THEN
        GRANT EXECUTE ON FUNCTION fleet_write_batch TO fleet_writer;
        GRANT INSERT ON batch_marks TO fleet_writer;  -- appended, never read
        GRANT USAGE ON SEQUENCE batch_marks_id_seq TO fleet_writer;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_sessions') THEN
        GRANT SELECT, DELETE ON batch_marks TO fleet_sessions;
    END IF;
END $$;
