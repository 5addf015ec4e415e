-- Live (hot store): the newest reading per device, one primary-key lookup away.
-- Same reading columns and checks as history; written by one bulk upsert per batch.

CREATE TABLE meter_live (
    meter_id        text          PRIMARY KEY,
    kwh_consumed_ac numeric(10,3) NOT NULL CHECK (kwh_consumed_ac >= 0),
    voltage         numeric(8,2)  NOT NULL CHECK (voltage >= 0 AND voltage <= 100000),
    "timestamp"     timestamptz   NOT NULL,
    updated_at      timestamptz   NOT NULL DEFAULT now()
) WITH (fillfactor = 70);  -- room on each page for HOT updates of the newest reading

CREATE TABLE vehicle_live (
    vehicle_id       text          PRIMARY KEY,
    soc              numeric(5,2)  NOT NULL CHECK (soc >= 0 AND soc <= 100),
    kwh_delivered_dc numeric(10,3) NOT NULL CHECK (kwh_delivered_dc >= 0),
    battery_temp     numeric(5,2)  NOT NULL CHECK (battery_temp >= -50 AND battery_temp <= 150),
    "timestamp"      timestamptz   NOT NULL,
    updated_at       timestamptz   NOT NULL DEFAULT now()
) WITH (fillfactor = 70);  -- room on each page for HOT updates of the newest reading
