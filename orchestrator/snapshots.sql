-- Snapshots of the projection (orchestrator/snapshots.py). Idempotent, like schema.sql.

CREATE TABLE IF NOT EXISTS snapshots (
    id           bigserial PRIMARY KEY,
    taken_at     timestamptz NOT NULL DEFAULT now(),
    code         text     NOT NULL,  -- the fold's code version that folded the rows
    checkpoints  bigint[] NOT NULL,  -- each partition's, by partition number
    entities     bigint   NOT NULL DEFAULT 0,
    seconds      double precision NOT NULL DEFAULT 0
);

-- The entities' rows as of the snapshot. No index beyond the key: a snapshot is written
-- once, read whole, and deleted whole.
CREATE TABLE IF NOT EXISTS snapshot_entities (
    snapshot  bigint NOT NULL,
    kind      text   NOT NULL,
    id        text   NOT NULL,
    state     jsonb  NOT NULL,
    last_seq  bigint NOT NULL,
    PRIMARY KEY (snapshot, kind, id)
);
