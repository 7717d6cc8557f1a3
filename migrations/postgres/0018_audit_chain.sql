-- The audit trail becomes a hash chain (src/audit/mod.rs): entries numbered 1, 2, 3… (`seq`) without gaps, each
-- with the hash of the one before and its own. `id` orders entries as they were appended; `seq`, `prev_hash` and
-- `hash` are given when an entry is sealed (SQLite: as it is appended, by the one writer; PostgreSQL: by the
-- sealer, after the entry's transaction committed, under the chain's advisory lock: see src/store/audit.rs).
-- Entries kept so far are copied in their order, unsealed, and sealed when the store opens. Entries now also
-- record what is not a record write (a read, a delivery, a refused key), so the record columns may be empty, and
-- name the client whose data it was (searched by client: AuditEvent?patient=).
CREATE TABLE audit_chain (
    id          BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    seq         BIGINT  UNIQUE,
    at          BIGINT  NOT NULL,
    actor       TEXT    NOT NULL,
    action      TEXT    NOT NULL,
    kind        TEXT,
    record_id   TEXT,
    version     BIGINT,
    client_id   TEXT,
    request_id  TEXT    NOT NULL,
    detail      TEXT,
    prev_hash   TEXT,
    hash        TEXT
);
INSERT INTO audit_chain (at, actor, action, kind, record_id, version, client_id, request_id)
    SELECT a.at, a.actor, a.action, a.kind, a.record_id, a.version,
           CASE WHEN a.kind = 'client' THEN a.record_id ELSE r.client_id END, a.request_id
    FROM audit_events a LEFT JOIN records r ON r.kind = a.kind AND r.id = a.record_id
    ORDER BY a.seq;
DROP TABLE audit_events;
ALTER TABLE audit_chain RENAME TO audit_events;
CREATE INDEX audit_events_client ON audit_events (client_id, seq);
CREATE INDEX audit_events_at ON audit_events (at);
CREATE INDEX audit_events_unsealed ON audit_events (id) WHERE seq IS NULL;
