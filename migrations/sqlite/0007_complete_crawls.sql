-- What a full sync needs to know about the last one that provably read the whole source: how many services it
-- listed (a crawl far below that deactivates nothing without force), and how it read their full records
-- (an HSDS API's list, `full=true`, or `/services/{id}`), decided once by a probe and kept.
ALTER TABLE directory_sync_state ADD COLUMN complete_count BIGINT;
ALTER TABLE directory_sync_state ADD COLUMN complete_at BIGINT;
ALTER TABLE directory_sync_state ADD COLUMN detail TEXT;
