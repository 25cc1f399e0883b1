-- The projection, the timelines, the outbox, dead letters and partition ownership.
-- Every statement is idempotent: each replica runs this at start.

CREATE TABLE IF NOT EXISTS entities (
    kind        text   NOT NULL,
    id          text   NOT NULL,
    state       jsonb  NOT NULL,
    last_seq    bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, id)
);

-- The reconciler's: entities whose jobs some host has not applied, by re-issues and by
-- when last issued, so that a tick reads only the rows that are overdue (reconciler.py's
-- queries repeat each predicate word for word).
CREATE INDEX IF NOT EXISTS entities_instance_lagging ON entities
    (((state->>'attempts')::int), ((state->>'issued_at')::bigint))
    WHERE kind = 'instance' AND state->>'host' IS NOT NULL
      AND state->>'status' IN ('placed', 'deleted')
      AND ((state->>'observed_generation')::int < (state->>'generation')::int
           OR state->'cleanup' <> '{}'::jsonb)
      AND state->'migration'->>'phase' IS DISTINCT FROM 'migrating';
CREATE INDEX IF NOT EXISTS entities_network_lagging ON entities
    (((state->>'attempts')::int), ((state->>'issued_at')::bigint))
    WHERE kind = 'network' AND state->>'status' = 'active'
      AND state @? '$.hosts.* ? (@.observed_generation < $.generation)';
CREATE INDEX IF NOT EXISTS entities_lb_lagging ON entities
    (((state->>'attempts')::int), ((state->>'issued_at')::bigint))
    WHERE kind = 'lb' AND state->>'stalled' IS NULL
      AND state @? '$.slots[*] ? (@.node != null && @.observed_generation < $.generation
          && (@.port.type() != "null" || $.status == "deleted" || $.status == "failed"))';

-- One row per command folded, keyed by its stream sequence: a command appears once.
CREATE TABLE IF NOT EXISTS history (
    seq      bigint PRIMARY KEY,
    kind     text   NOT NULL,
    id       text   NOT NULL,
    outcome  jsonb  NOT NULL
);
CREATE INDEX IF NOT EXISTS history_entity ON history (kind, id, seq);
-- `orch trace CMD_ID` finds a command by its idempotency key: without this, a scan of the
-- whole history (0.19 s at 1,000,000 commands); built in 0.6 s there, 21 MB.
CREATE INDEX IF NOT EXISTS history_cmd_id ON history ((outcome->>'cmd_id'));
-- `orch log` filters on these fields, newest first: with their statistics the planner scans
-- the table for a rare value (one admin command in 1,000,000: 0.18 s) instead of the whole
-- primary key backwards (0.81 s), and still stops early for a common one. No write cost.
CREATE STATISTICS IF NOT EXISTS history_outcome_fields
    ON (outcome->>'source'), (outcome->>'type'), (outcome->>'accepted') FROM history;

-- Written in the fold's transaction, published after it, deleted once acknowledged.
CREATE TABLE IF NOT EXISTS outbox (
    partition  int    NOT NULL,
    seq        bigint NOT NULL,
    n          int    NOT NULL,
    subject    text   NOT NULL,
    msg_id     text   NOT NULL,
    payload    bytea  NOT NULL,
    PRIMARY KEY (partition, seq, n)
);
-- A row lives for milliseconds: compressing a large payload (the job of a network of 1,000
-- ports is 32 KB) took the fold's transaction ~0.9 ms a job and saved nothing. Changed
-- once (the ALTER locks the table).
DO $$
BEGIN
    IF (SELECT attstorage FROM pg_attribute
        WHERE attrelid = 'outbox'::regclass AND attname = 'payload') <> 'e' THEN
        ALTER TABLE outbox ALTER COLUMN payload SET STORAGE EXTERNAL;
    END IF;
END $$;

CREATE TABLE IF NOT EXISTS dead_letters (
    seq       bigint PRIMARY KEY,
    subject   text   NOT NULL,
    reason    text   NOT NULL,
    payload   bytea  NOT NULL,
    at        timestamptz NOT NULL
);

-- Ownership with fencing: a batch commits only under the owner and epoch it was fetched by.
CREATE TABLE IF NOT EXISTS partitions (
    partition    int    PRIMARY KEY,
    owner        text,
    epoch        bigint NOT NULL DEFAULT 0,
    lease_until  timestamptz NOT NULL DEFAULT 'epoch',
    checkpoint   bigint NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS replicas (
    id    text PRIMARY KEY,
    seen  timestamptz NOT NULL
);

-- The rows commit_batches takes, one array per table: composite values, so that a client
-- sends one element per row rather than one per column. `b` is the row's batch, its index
-- in the array of batch heads. A type is only created when missing: changing its fields
-- takes a new name.
DO $$ BEGIN
    IF to_regtype('batch_head') IS NULL THEN
        CREATE TYPE batch_head AS (partition int, owner text, epoch bigint, expected bigint,
            checkpoint bigint, relayed_after bigint, relayed_upto bigint);
    END IF;
    IF to_regtype('entity_row') IS NULL THEN
        CREATE TYPE entity_row AS (b int, kind text, id text, state jsonb, last_seq bigint);
    END IF;
    IF to_regtype('history_row') IS NULL THEN
        CREATE TYPE history_row AS (b int, seq bigint, kind text, id text, outcome jsonb);
    END IF;
    IF to_regtype('outbox_row') IS NULL THEN
        CREATE TYPE outbox_row AS (b int, seq bigint, n int, subject text, msg_id text,
            payload bytea);
    END IF;
    IF to_regtype('dead_letter_row') IS NULL THEN
        CREATE TYPE dead_letter_row AS (b int, seq bigint, subject text, reason text,
            payload bytea, at timestamptz);
    END IF;
END $$;

-- Folded batches of any partitions, each all or nothing, in one round trip: a batch is
-- fenced (and writes nothing) unless its owner holds the partition at its epoch and
-- checkpoint. Each partition row is locked first, so a takeover waits for this commit or
-- fences it. Callers pass batches in partition order: whatever else locks several
-- partition rows (lease renewal, a replica leaving) locks them in that order too, so none
-- of them deadlock. Returns, for each batch, NULL or why it is fenced.
DROP FUNCTION IF EXISTS commit_batch;
CREATE OR REPLACE FUNCTION commit_batches(
    heads batch_head[], e entity_row[], h history_row[], o outbox_row[], d dead_letter_row[]
) RETURNS text[] LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    fenced text[] := array_fill(NULL::text, ARRAY[cardinality(heads)]);
    ok int[] := '{}';
    k int;
    head batch_head;
    current bigint;
BEGIN
    FOR i IN 1 .. cardinality(heads) LOOP
        head := heads[i];
        SELECT checkpoint INTO current FROM partitions
        WHERE partition = head.partition AND owner = head.owner AND epoch = head.epoch
          AND lease_until > now()
        FOR UPDATE;
        IF NOT FOUND THEN
            fenced[i] := format('partition %s epoch %s is not ours', head.partition, head.epoch);
        ELSIF current <> head.expected THEN
            fenced[i] := format('partition %s checkpoint is %s, expected %s',
                                head.partition, current, head.expected);
        ELSE
            ok := ok || i;
        END IF;
    END LOOP;
    IF cardinality(ok) = 0 THEN
        RETURN fenced;
    END IF;
    -- Small batches are the common case when load is light: skip the empty statements.
    IF cardinality(e) > 0 THEN
        INSERT INTO entities (kind, id, state, last_seq)
        SELECT r.kind, r.id, r.state, r.last_seq FROM unnest(e) AS r WHERE r.b = ANY(ok)
        ON CONFLICT (kind, id) DO UPDATE
        SET state = EXCLUDED.state, last_seq = EXCLUDED.last_seq, updated_at = now();
    END IF;
    IF cardinality(h) > 0 THEN
        INSERT INTO history (seq, kind, id, outcome)
        SELECT r.seq, r.kind, r.id, r.outcome FROM unnest(h) AS r WHERE r.b = ANY(ok);
    END IF;
    IF cardinality(o) > 0 THEN
        INSERT INTO outbox (partition, seq, n, subject, msg_id, payload)
        SELECT (heads[r.b]).partition, r.seq, r.n, r.subject, r.msg_id, r.payload
        FROM unnest(o) AS r WHERE r.b = ANY(ok);
    END IF;
    IF cardinality(d) > 0 THEN
        INSERT INTO dead_letters (seq, subject, reason, payload, at)
        SELECT r.seq, r.subject, r.reason, r.payload, r.at FROM unnest(d) AS r
        WHERE r.b = ANY(ok);
    END IF;
    FOREACH k IN ARRAY ok LOOP
        head := heads[k];
        IF head.relayed_upto > 0 THEN
            DELETE FROM outbox WHERE partition = head.partition
              AND seq > head.relayed_after AND seq <= head.relayed_upto;
        END IF;
        UPDATE partitions SET checkpoint = head.checkpoint WHERE partition = head.partition;
    END LOOP;
    RETURN fenced;
END $$;
