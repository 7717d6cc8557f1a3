-- Text search on words the gateway folds and stems itself (directories::search_text), the same on every backend:
-- `search_name` (name and alternate name, weight A) and `search_body` (description, weight B), each word with
-- its stem, under the `simple` configuration (no stemming of its own), so a prefix runs on the word as typed,
-- never on its stem. The gateway fills both columns for the services kept before this migration when it opens
-- the database (`search_version` says by which rules a row was indexed).
ALTER TABLE directory_services ADD COLUMN alternate_name TEXT;
ALTER TABLE directory_services ADD COLUMN search_name TEXT NOT NULL DEFAULT '';
ALTER TABLE directory_services ADD COLUMN search_body TEXT NOT NULL DEFAULT '';
ALTER TABLE directory_services ADD COLUMN search_version BIGINT NOT NULL DEFAULT 0;

DROP INDEX directory_services_search;
ALTER TABLE directory_services DROP COLUMN search;
ALTER TABLE directory_services ADD COLUMN search TSVECTOR GENERATED ALWAYS AS (
    setweight(to_tsvector('simple', search_name), 'A') || setweight(to_tsvector('simple', search_body), 'B')
) STORED;
CREATE INDEX directory_services_search ON directory_services USING GIN (search);

-- The taxonomy terms each source gave, with the broader term each is part of (HSDS `parent_id`), so a search
-- by a term also finds the services of the terms under it.
CREATE TABLE directory_taxonomy_terms (
    source     TEXT NOT NULL,
    term_id    TEXT NOT NULL,
    taxonomy   TEXT NOT NULL,
    code       TEXT NOT NULL,
    parent_id  TEXT,
    PRIMARY KEY (source, term_id)
);
CREATE INDEX directory_taxonomy_terms_by_code ON directory_taxonomy_terms (code);
CREATE INDEX directory_taxonomy_terms_by_parent ON directory_taxonomy_terms (source, parent_id);

-- Services now keep location and service-at-location phones, languages and hours, alternate names and term
-- hierarchies: the next sync of every source reads it whole once.
UPDATE directory_sync_state SET watermark = NULL;
