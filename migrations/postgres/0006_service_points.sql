-- Each service's points (the coordinates of its locations), so a radius search reads one covering index instead
-- of joining locations to services. Kept with the rest of the service at every upsert; filled here for the
-- services already kept.
CREATE TABLE directory_service_points (
    service_id  TEXT              NOT NULL,
    latitude    DOUBLE PRECISION  NOT NULL,
    longitude   DOUBLE PRECISION  NOT NULL
);
CREATE INDEX directory_service_points_geo ON directory_service_points (latitude, longitude, service_id);
CREATE INDEX directory_service_points_by_service ON directory_service_points (service_id);
INSERT INTO directory_service_points (service_id, latitude, longitude)
SELECT sl.service_id, l.latitude, l.longitude
FROM directory_service_locations sl JOIN directory_locations l ON l.id = sl.location_id
WHERE l.latitude IS NOT NULL AND l.longitude IS NOT NULL;
