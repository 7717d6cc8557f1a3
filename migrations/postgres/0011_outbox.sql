-- The outbox becomes a queue that workers claim and settle. Each row gets a stable number (its id in the API and
-- the CLI), the client it belongs to and its kind's rank (a client's rows go client → consent → assessment →
-- care plan → referral, so a reference waits for what it names), when it may next be tried, the lease of the
-- worker holding it, and what the last attempt said.
CREATE TABLE outbox (
    seq BIGSERIAL PRIMARY KEY,
    kind          TEXT   NOT NULL,
    id            TEXT   NOT NULL,
    version       BIGINT NOT NULL,
    partner       TEXT   NOT NULL,
    client_id     TEXT,
    rank          BIGINT NOT NULL,
    state         TEXT   NOT NULL,
    attempts      BIGINT NOT NULL DEFAULT 0,
    not_before    BIGINT NOT NULL,
    lease_owner   TEXT,
    lease_until   BIGINT,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    detail        TEXT,
    UNIQUE (kind, id, version, partner)
);
INSERT INTO outbox (kind, id, version, partner, client_id, rank, state, attempts, not_before, created_at, updated_at)
SELECT d.kind, d.id, d.version, d.partner, r.client_id,
       CASE d.kind WHEN 'client' THEN 0 WHEN 'consent' THEN 1 WHEN 'assessment' THEN 2 WHEN 'care-plan' THEN 3 ELSE 4 END,
       d.state, d.attempts, d.created_at, d.created_at, d.created_at
FROM deliveries d LEFT JOIN records r ON r.kind = d.kind AND r.id = d.id
ORDER BY d.created_at, d.kind, d.id, d.version, d.partner;
DROP TABLE deliveries;
-- Due rows, oldest first; the newest pending version of one record and partner; a client's earlier ranks.
CREATE INDEX outbox_due ON outbox (state, not_before);
CREATE INDEX outbox_by_client ON outbox (partner, client_id, rank, state);
CREATE INDEX outbox_by_partner ON outbox (partner, state, created_at);

-- Every attempt at a delivery: when, how long, what the partner answered (status, its OperationOutcome), what
-- the gateway decided. Never the payload.
CREATE TABLE outbox_attempts (
    seq BIGSERIAL PRIMARY KEY,
    delivery      BIGINT NOT NULL,
    at            BIGINT NOT NULL,
    ms            BIGINT NOT NULL,
    outcome       TEXT   NOT NULL,
    status        BIGINT,
    detail        TEXT   NOT NULL,
    operation_outcome TEXT
);
CREATE INDEX outbox_attempts_by_delivery ON outbox_attempts (delivery, seq);

-- What each partner holds of ours: the resource the mapping names (`Observation/as-2001`) → the type, id and
-- version the partner assigned, and the hash of the content last sent (identical content is not sent again).
CREATE TABLE crosswalk (
    partner       TEXT   NOT NULL,
    local_ref     TEXT   NOT NULL,
    kind          TEXT   NOT NULL,
    record_id     TEXT   NOT NULL,
    remote_type   TEXT   NOT NULL,
    remote_id     TEXT   NOT NULL,
    version_id    TEXT,
    content_hash  TEXT   NOT NULL,
    updated_at    BIGINT NOT NULL,
    PRIMARY KEY (partner, local_ref)
);
CREATE INDEX crosswalk_by_remote ON crosswalk (partner, remote_type, remote_id);

-- A record delivered with a logical reference to one of our resources that the partner did not hold yet (a care
-- plan sent before its referrals): when that resource reaches the partner, the record is queued again so the
-- reference becomes the partner's id.
CREATE TABLE crosswalk_waits (
    partner       TEXT   NOT NULL,
    local_ref     TEXT   NOT NULL,
    kind          TEXT   NOT NULL,
    record_id     TEXT   NOT NULL,
    PRIMARY KEY (partner, local_ref, kind, record_id)
);
