-- Agency records, their version history and the audit log.
-- Times are microseconds since the Unix epoch (UTC); bodies are canonical JSON text.

CREATE TABLE records (
    kind        TEXT    NOT NULL,
    id          TEXT    NOT NULL,
    version     BIGINT  NOT NULL,
    body        TEXT    NOT NULL,
    client_id   TEXT,
    status      TEXT,
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL,
    updated_by  TEXT    NOT NULL,
    PRIMARY KEY (kind, id)
);
CREATE INDEX records_by_client ON records (kind, client_id, id);
CREATE INDEX records_by_status ON records (kind, status, id);
CREATE INDEX records_by_updated ON records (kind, updated_at);

CREATE TABLE record_versions (
    kind        TEXT    NOT NULL,
    id          TEXT    NOT NULL,
    version     BIGINT  NOT NULL,
    body        TEXT    NOT NULL,
    action      TEXT    NOT NULL,
    changed_at  BIGINT  NOT NULL,
    changed_by  TEXT    NOT NULL,
    request_id  TEXT    NOT NULL,
    PRIMARY KEY (kind, id, version)
);

CREATE TABLE audit_events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    at          BIGINT  NOT NULL,
    actor       TEXT    NOT NULL,
    action      TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    record_id   TEXT    NOT NULL,
    version     BIGINT  NOT NULL,
    request_id  TEXT    NOT NULL
);
