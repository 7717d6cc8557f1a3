-- The outbox: one row per new version of a record and partner that receives it, written in the same transaction
-- as the record, its history row and its audit entry (nothing accepted is ever without its deliveries). Delivery
-- workers claim, deliver and settle these rows; superseded versions of one record and partner are coalesced there.
CREATE TABLE deliveries (
    kind        TEXT   NOT NULL,
    id          TEXT   NOT NULL,
    version     BIGINT NOT NULL,
    partner     TEXT   NOT NULL,
    state       TEXT   NOT NULL,
    attempts    BIGINT NOT NULL DEFAULT 0,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (kind, id, version, partner)
);
CREATE INDEX deliveries_by_partner_state ON deliveries (partner, state, created_at);
