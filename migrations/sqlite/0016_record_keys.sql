-- The identifiers a record is found by (a client's Medicaid number or MRN): a partner's Patient is matched to the
-- agency's client on them without reading every client.
CREATE TABLE record_keys (
    kind    TEXT NOT NULL,
    system  TEXT NOT NULL,
    value   TEXT NOT NULL,
    id      TEXT NOT NULL,
    PRIMARY KEY (kind, system, value, id)
);
CREATE INDEX record_keys_by_record ON record_keys (kind, id);
INSERT OR IGNORE INTO record_keys (kind, system, value, id)
SELECT 'client', json_extract(i.value, '$.system'), json_extract(i.value, '$.value'), r.id
FROM records r, json_each(r.body, '$.identifiers') i
WHERE r.kind = 'client' AND json_extract(i.value, '$.system') IS NOT NULL AND json_extract(i.value, '$.value') IS NOT NULL;
