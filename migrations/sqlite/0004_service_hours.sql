-- Weekly opening hours, for `open_now` searches (see src/directories/hours.rs): each service's schedules as
-- intervals within one day, in the local time of `zone` (an IANA name; schedules with a fixed UTC offset are
-- normalised to UTC when written, zone 'UTC'). `day` 0 = Monday … 6 = Sunday; minutes from local midnight,
-- `closes_min` exclusive (1440 = the end of the day); an interval past midnight is two rows. Replaced with the
-- rest of a service at each upsert.
CREATE TABLE directory_service_hours (
    service_id  TEXT     NOT NULL,
    zone        TEXT     NOT NULL,
    day         INTEGER  NOT NULL,
    opens_min   INTEGER  NOT NULL,
    closes_min  INTEGER  NOT NULL
);
CREATE INDEX directory_service_hours_lookup ON directory_service_hours (zone, day, opens_min, closes_min, service_id);
CREATE INDEX directory_service_hours_by_service ON directory_service_hours (service_id);

-- Every zone the hours use, so a search knows which local times to compute without scanning the hours.
CREATE TABLE directory_time_zones (
    zone  TEXT  PRIMARY KEY
);

-- The version of the hours rules a service's rows were written by (0: none yet). Services kept before this
-- migration get their hours when the sync next reads them, even unchanged; the watermarks are cleared so that the
-- next sync of every source, incremental or not, reads everything once.
ALTER TABLE directory_services ADD COLUMN hours_version BIGINT NOT NULL DEFAULT 0;
UPDATE directory_sync_state SET watermark = NULL;
