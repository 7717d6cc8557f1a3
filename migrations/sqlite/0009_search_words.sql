-- Text search on words the gateway folds and stems itself (directories::search_text), the same on every backend:
-- `search_name` (name and alternate name) and `search_body` (description), each word with its stem. FTS5 only
-- looks the words up (unicode61, no stemming of its own), so a prefix runs on the word as typed, never on its
-- stem. The gateway fills both columns for the services kept before this migration when it opens the database
-- (`search_version` says by which rules a row was indexed).
ALTER TABLE directory_services ADD COLUMN alternate_name TEXT;
ALTER TABLE directory_services ADD COLUMN search_name TEXT NOT NULL DEFAULT '';
ALTER TABLE directory_services ADD COLUMN search_body TEXT NOT NULL DEFAULT '';
ALTER TABLE directory_services ADD COLUMN search_version BIGINT NOT NULL DEFAULT 0;

DROP TRIGGER directory_services_fts_insert;
DROP TRIGGER directory_services_fts_delete;
DROP TRIGGER directory_services_fts_update;
DROP TABLE directory_services_fts;
CREATE VIRTUAL TABLE directory_services_fts USING fts5(
    search_name, search_body, content='directory_services', content_rowid='rowid',
    tokenize='unicode61 remove_diacritics 2'
);
CREATE TRIGGER directory_services_fts_insert AFTER INSERT ON directory_services BEGIN
    INSERT INTO directory_services_fts (rowid, search_name, search_body)
    VALUES (new.rowid, new.search_name, new.search_body);
END;
CREATE TRIGGER directory_services_fts_delete AFTER DELETE ON directory_services BEGIN
    INSERT INTO directory_services_fts (directory_services_fts, rowid, search_name, search_body)
    VALUES ('delete', old.rowid, old.search_name, old.search_body);
END;
CREATE TRIGGER directory_services_fts_update AFTER UPDATE OF search_name, search_body ON directory_services BEGIN
    INSERT INTO directory_services_fts (directory_services_fts, rowid, search_name, search_body)
    VALUES ('delete', old.rowid, old.search_name, old.search_body);
    INSERT INTO directory_services_fts (rowid, search_name, search_body)
    VALUES (new.rowid, new.search_name, new.search_body);
END;
INSERT INTO directory_services_fts (directory_services_fts) VALUES ('rebuild');

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
