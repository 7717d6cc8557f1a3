-- Topic-based Subscriptions the gateway keeps at partners (R4 backport, rest-hook, id-only): one per partner.
-- `token_hash` is the SHA-256 of the bearer token the partner sends with each notification (the token itself is
-- only in the Subscription at the partner); `events_seen` the highest event number received; `owed_sweep` set when
-- a gap in the event numbers, a late heartbeat or an error says notifications were missed (a sweep recovers them).
CREATE TABLE partner_subscriptions (
    partner      TEXT    NOT NULL PRIMARY KEY,
    remote_id    TEXT,
    token_hash   TEXT    NOT NULL,
    status       TEXT    NOT NULL,
    events_seen  BIGINT  NOT NULL DEFAULT 0,
    heard_at     BIGINT,
    owed_sweep   BOOLEAN NOT NULL DEFAULT TRUE,
    created_at   BIGINT  NOT NULL
);

-- The Tasks notifications named and the worker has not read yet (kept before the notification is answered, so a
-- crash loses none); one row per Task, the newest event number kept.
CREATE TABLE subscription_events (
    partner      TEXT    NOT NULL,
    focus        TEXT    NOT NULL,
    event_number BIGINT  NOT NULL,
    received_at  BIGINT  NOT NULL,
    PRIMARY KEY (partner, focus)
);
