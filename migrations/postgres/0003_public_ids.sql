-- The id a service is published under as HSDS (a UUID v5 of its gateway id: HSDS ids are UUIDs).
-- Rows from before this column get theirs at their next sync.
ALTER TABLE directory_services ADD COLUMN public_id TEXT;
CREATE UNIQUE INDEX directory_services_public_id ON directory_services (public_id);
