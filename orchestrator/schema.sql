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

-- One row per command folded, keyed by its stream sequence: a command appears once.
CREATE TABLE IF NOT EXISTS history (
    seq      bigint PRIMARY KEY,
    kind     text   NOT NULL,
    id       text   NOT NULL,
    outcome  jsonb  NOT NULL
);
CREATE INDEX IF NOT EXISTS history_entity ON history (kind, id, seq);

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

-- Folded batches of any partitions, each all or nothing, in one round trip: a batch is
-- fenced (and writes nothing) unless its owner holds the partition at its epoch and
-- checkpoint. Each partition row is locked first, so a takeover waits for this commit or
-- fences it. Row arrays name their batch by its index in the b_ arrays. Callers pass
-- batches in partition order, so that two replicas' commits never deadlock. Returns, for
-- each batch, NULL or why it is fenced.
DROP FUNCTION IF EXISTS commit_batch;
CREATE OR REPLACE FUNCTION commit_batches(
    b_p int[], b_owner text[], b_epoch bigint[], b_expected bigint[], b_checkpoint bigint[],
    b_relayed_after bigint[], b_relayed_upto bigint[],
    e_b int[], e_kind text[], e_id text[], e_state jsonb[], e_seq bigint[],
    h_b int[], h_seq bigint[], h_kind text[], h_id text[], h_outcome jsonb[],
    o_b int[], o_seq bigint[], o_n int[], o_subject text[], o_msg_id text[], o_payload bytea[],
    d_b int[], d_seq bigint[], d_subject text[], d_reason text[], d_payload bytea[],
    d_at timestamptz[]
) RETURNS text[] LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    fenced text[] := array_fill(NULL::text, ARRAY[cardinality(b_p)]);
    ok int[] := '{}';
    k int;
    current bigint;
BEGIN
    FOR i IN 1 .. cardinality(b_p) LOOP
        SELECT checkpoint INTO current FROM partitions
        WHERE partition = b_p[i] AND owner = b_owner[i] AND epoch = b_epoch[i]
          AND lease_until > now()
        FOR UPDATE;
        IF NOT FOUND THEN
            fenced[i] := format('partition %s epoch %s is not ours', b_p[i], b_epoch[i]);
        ELSIF current <> b_expected[i] THEN
            fenced[i] := format('partition %s checkpoint is %s, expected %s',
                                b_p[i], current, b_expected[i]);
        ELSE
            ok := ok || i;
        END IF;
    END LOOP;
    IF cardinality(ok) = 0 THEN
        RETURN fenced;
    END IF;
    -- Small batches are the common case when load is light: skip the empty statements.
    IF cardinality(e_b) > 0 THEN
        INSERT INTO entities (kind, id, state, last_seq)
        SELECT k, i, s, q FROM unnest(e_b, e_kind, e_id, e_state, e_seq) AS r(b, k, i, s, q)
        WHERE b = ANY(ok)
        ON CONFLICT (kind, id) DO UPDATE
        SET state = EXCLUDED.state, last_seq = EXCLUDED.last_seq, updated_at = now();
    END IF;
    IF cardinality(h_b) > 0 THEN
        INSERT INTO history
        SELECT q, k, i, o FROM unnest(h_b, h_seq, h_kind, h_id, h_outcome) AS r(b, q, k, i, o)
        WHERE b = ANY(ok);
    END IF;
    IF cardinality(o_b) > 0 THEN
        INSERT INTO outbox
        SELECT b_p[b], q, n, s, m, d
        FROM unnest(o_b, o_seq, o_n, o_subject, o_msg_id, o_payload) AS r(b, q, n, s, m, d)
        WHERE b = ANY(ok);
    END IF;
    IF cardinality(d_b) > 0 THEN
        INSERT INTO dead_letters
        SELECT q, s, w, d, t
        FROM unnest(d_b, d_seq, d_subject, d_reason, d_payload, d_at) AS r(b, q, s, w, d, t)
        WHERE b = ANY(ok);
    END IF;
    FOREACH k IN ARRAY ok LOOP
        IF b_relayed_upto[k] > 0 THEN
            DELETE FROM outbox WHERE partition = b_p[k]
              AND seq > b_relayed_after[k] AND seq <= b_relayed_upto[k];
        END IF;
        UPDATE partitions SET checkpoint = b_checkpoint[k] WHERE partition = b_p[k];
    END LOOP;
    RETURN fenced;
END $$;
