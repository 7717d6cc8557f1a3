-- The HSDS ids of organisations and taxonomy terms (UUID v5 of the gateway id, and of `taxonomy|code`), so that
-- `/hsds/services?organization_id=&taxonomy_term_id=` can filter by them. The gateway fills the rows from before
-- this migration (and services still without their 0003 id) when it opens the database.
ALTER TABLE directory_organizations ADD COLUMN public_id TEXT;
CREATE UNIQUE INDEX directory_organizations_public_id ON directory_organizations (public_id);
ALTER TABLE directory_service_terms ADD COLUMN public_id TEXT;
CREATE INDEX directory_service_terms_by_public_id ON directory_service_terms (public_id, service_id);
