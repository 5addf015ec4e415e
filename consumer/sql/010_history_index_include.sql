-- INCLUDE the energy and temperature columns in the (device, timestamp) unique indexes:
-- a device's window becomes an index-only scan for the analytics sums, a few index
-- pages instead of one heap page per reading (readings of one device are spread over
-- the heap in arrival order). This was first written into 001 after it had landed;
-- databases migrated before then get it here, and 001 is back as it landed.
-- Building an index on a partitioned table blocks writes to it while it builds: on a
-- large history, run this migration in a quiet hour (consumers wait and catch up).

CREATE UNIQUE INDEX meter_history_device_ts_include ON meter_history (meter_id, "timestamp")
    INCLUDE (kwh_consumed_ac);
DROP INDEX meter_history_device_ts;
ALTER INDEX meter_history_device_ts_include RENAME TO meter_history_device_ts;

CREATE UNIQUE INDEX vehicle_history_device_ts_include ON vehicle_history (vehicle_id, "timestamp")
    INCLUDE (kwh_delivered_dc, battery_temp);
DROP INDEX vehicle_history_device_ts;
ALTER INDEX vehicle_history_device_ts_include RENAME TO vehicle_history_device_ts;
