-- Referrals go both ways: the direction is indexed for `GET /api/v1/referrals?direction=inbound`, and each version
-- records the partner that made it (a status a hospital set on /fhir or on its own server), NULL for the agency.
ALTER TABLE records ADD COLUMN direction TEXT;
UPDATE records SET direction = 'outbound' WHERE kind = 'referral';
CREATE INDEX records_by_direction ON records (kind, direction, id);
ALTER TABLE record_versions ADD COLUMN partner TEXT;
