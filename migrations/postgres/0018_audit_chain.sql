-- The audit trail becomes a hash chain (src/audit.rs): entries numbered 1, 2, 3… without gaps, given by the
-- appender under the chain's lock (no longer by AUTOINCREMENT / IDENTITY, which may skip numbers a rolled-back
-- transaction took), each with the hash of the one before and its own. Entries kept so far are renumbered in
-- their order (the same numbers wherever none was skipped) and sealed when the store opens.
CREATE TABLE audit_chain (
    seq         BIGINT  PRIMARY KEY,
    at          BIGINT  NOT NULL,
    actor       TEXT    NOT NULL,
    action      TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    record_id   TEXT    NOT NULL,
    version     BIGINT  NOT NULL,
    request_id  TEXT    NOT NULL,
    detail      TEXT,
    prev_hash   TEXT,
    hash        TEXT
);
INSERT INTO audit_chain (seq, at, actor, action, kind, record_id, version, request_id)
    SELECT ROW_NUMBER() OVER (ORDER BY seq), at, actor, action, kind, record_id, version, request_id
    FROM audit_events;
DROP TABLE audit_events;
ALTER TABLE audit_chain RENAME TO audit_events;
