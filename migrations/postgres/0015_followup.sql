-- Following referrals on partners' servers: per partner, where the last sweep of its Tasks got to (the partner's
-- own `meta.lastUpdated`, as it wrote it) and the lease that lets one replica sweep it at a time.
CREATE TABLE followup_cursors (
    partner      TEXT   NOT NULL PRIMARY KEY,
    last_seen    TEXT,
    swept_at     BIGINT,
    holder       TEXT,
    expires_at   BIGINT NOT NULL DEFAULT 0
);
