-- One sync per directory source at a time, across replicas: the lease row names the job holding it and until
-- when; it is taken with a conditional upsert (free, or expired) and renewed while the sync runs, so a crashed
-- holder's lease lapses on its own.
CREATE TABLE directory_sync_leases (
    source      TEXT   PRIMARY KEY,
    holder      TEXT   NOT NULL,
    expires_at  BIGINT NOT NULL
);

-- Every sync as a job (API, CLI or schedule): its state, counts so far, and how it ended, readable by any
-- replica after it finished.
CREATE TABLE directory_sync_jobs (
    id           TEXT   PRIMARY KEY,
    source       TEXT   NOT NULL,
    mode         TEXT   NOT NULL,
    force        BIGINT NOT NULL,
    started_by   TEXT   NOT NULL,
    state        TEXT   NOT NULL,
    created_at   BIGINT NOT NULL,
    started_at   BIGINT,
    finished_at  BIGINT,
    updated_at   BIGINT NOT NULL,
    progress     TEXT   NOT NULL,
    report       TEXT,
    error        TEXT
);
CREATE INDEX directory_sync_jobs_by_source ON directory_sync_jobs (source, created_at);
