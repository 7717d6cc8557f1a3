-- The service catalog: directory services normalised from their sources (HSDS, FHIR directories).
-- Times are microseconds since the Unix epoch; `doc` is the normalised service, `raw` the record as received.

CREATE TABLE directory_organizations (
    id          TEXT    PRIMARY KEY,
    source      TEXT    NOT NULL,
    source_id   TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    doc         TEXT    NOT NULL,
    updated_at  BIGINT  NOT NULL
);

CREATE TABLE directory_locations (
    id          TEXT    PRIMARY KEY,
    source      TEXT    NOT NULL,
    source_id   TEXT    NOT NULL,
    name        TEXT,
    latitude    REAL,
    longitude   REAL,
    doc         TEXT    NOT NULL,
    updated_at  BIGINT  NOT NULL
);
CREATE INDEX directory_locations_geo ON directory_locations (latitude, longitude);

CREATE TABLE directory_services (
    id               TEXT    PRIMARY KEY,
    source           TEXT    NOT NULL,
    source_id        TEXT    NOT NULL,
    name             TEXT    NOT NULL,
    description      TEXT    NOT NULL,
    status           TEXT    NOT NULL,
    organization_id  TEXT,
    active           BIGINT  NOT NULL,
    vanished_at      BIGINT,
    doc              TEXT    NOT NULL,
    raw              TEXT    NOT NULL,
    source_modified  BIGINT,
    seen_at          BIGINT  NOT NULL,
    updated_at       BIGINT  NOT NULL,
    UNIQUE (source, source_id)
);
CREATE INDEX directory_services_by_source ON directory_services (source, active, seen_at);
CREATE INDEX directory_services_by_name ON directory_services (active, name);

CREATE TABLE directory_service_locations (
    service_id   TEXT NOT NULL,
    location_id  TEXT NOT NULL,
    PRIMARY KEY (service_id, location_id)
);
CREATE INDEX directory_service_locations_by_location ON directory_service_locations (location_id);

CREATE TABLE directory_service_terms (
    service_id  TEXT NOT NULL,
    taxonomy    TEXT NOT NULL,
    code        TEXT NOT NULL,
    name        TEXT NOT NULL,
    PRIMARY KEY (service_id, taxonomy, code)
);
CREATE INDEX directory_service_terms_by_code ON directory_service_terms (code, taxonomy, service_id);

CREATE TABLE directory_service_languages (
    service_id  TEXT NOT NULL,
    language    TEXT NOT NULL,
    PRIMARY KEY (service_id, language)
);
CREATE INDEX directory_service_languages_by_language ON directory_service_languages (language, service_id);

CREATE TABLE directory_sync_state (
    source        TEXT    PRIMARY KEY,
    watermark     BIGINT,
    last_success  BIGINT  NOT NULL
);

-- Full text over name (weighted) and description, kept in step by triggers.
CREATE VIRTUAL TABLE directory_services_fts USING fts5(
    name, description, content='directory_services', content_rowid='rowid', tokenize='porter unicode61'
);
CREATE TRIGGER directory_services_fts_insert AFTER INSERT ON directory_services BEGIN
    INSERT INTO directory_services_fts (rowid, name, description) VALUES (new.rowid, new.name, new.description);
END;
CREATE TRIGGER directory_services_fts_delete AFTER DELETE ON directory_services BEGIN
    INSERT INTO directory_services_fts (directory_services_fts, rowid, name, description)
    VALUES ('delete', old.rowid, old.name, old.description);
END;
CREATE TRIGGER directory_services_fts_update AFTER UPDATE OF name, description ON directory_services BEGIN
    INSERT INTO directory_services_fts (directory_services_fts, rowid, name, description)
    VALUES ('delete', old.rowid, old.name, old.description);
    INSERT INTO directory_services_fts (rowid, name, description) VALUES (new.rowid, new.name, new.description);
END;
