-- One consumer batch, written in one round trip (the caller's transaction):
--   1. fence: advance every partition's stored offset, only where the caller's
--      fence token is current and the stored offset is not past the batch; if
--      any partition fails, write nothing and return the fenced partitions;
--   2. history: append the readings; a re-sent reading (same device and
--      timestamp) conflicts with the stored one and is skipped;
--   3. live: collapse to the newest reading per device (the first seen wins a
--      tie, as in history), upsert; the guard keeps a newer stored reading;
--   4. dead letters: append the rejects with their bytes, source and reason.
-- Arrays arrive binary-encoded; float8 values are rounded to the numeric columns.

CREATE FUNCTION fleet_write_batch(
    p_group text,
    o_topic text[], o_partition int[], o_first bigint[], o_next bigint[], o_fence bigint[],
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

    -- Step 1: fence. Lock the rows (in the caller's sorted order: no deadlocks),
    -- check every token, and only then advance: a fenced batch writes nothing.
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
           SET next_offset = b.next, updated_at = now()
          FROM unnest(o_topic, o_partition, o_next) AS b(topic, part, next)
         WHERE o.group_id = p_group AND o.topic = b.topic AND o."partition" = b.part;
    END IF;

    -- Step 2 and 3: meters.
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

    -- Step 2 and 3: vehicles.
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

    -- Step 4: dead letters.
    IF cardinality(d_topic) > 0 THEN
        INSERT INTO dead_letters (topic, "partition", "offset", message_key, payload, reason, detail)
        SELECT * FROM unnest(d_topic, d_partition, d_offset, d_key, d_payload, d_reason, d_detail);
    END IF;
END $$;
