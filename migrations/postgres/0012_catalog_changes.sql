-- The catalog's change counter, for the search index each gateway keeps in memory (directories::index): every
-- write that changes what a search may find (a service added or changed, its hours indexed again, a service
-- deactivated) takes the next number in its transaction and stamps the service with it. The counter row stays
-- locked until that transaction commits, so numbers commit in order, and an index that has read up to number N
-- reads `change_seq > N` and is current. Rows kept before this migration carry 0.
ALTER TABLE directory_services ADD COLUMN change_seq BIGINT NOT NULL DEFAULT 0;
CREATE INDEX directory_services_by_change ON directory_services (change_seq, id);
CREATE TABLE directory_catalog_version (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  BIGINT NOT NULL
);
INSERT INTO directory_catalog_version (id, seq) VALUES (1, 0);
