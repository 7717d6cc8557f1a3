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
INSERT INTO record_keys (kind, system, value, id)
SELECT 'client', i->>'system', i->>'value', r.id
FROM records r, jsonb_array_elements(COALESCE(r.body::jsonb->'identifiers', '[]'::jsonb)) i
WHERE r.kind = 'client' AND i->>'system' IS NOT NULL AND i->>'value' IS NOT NULL
ON CONFLICT DO NOTHING;
