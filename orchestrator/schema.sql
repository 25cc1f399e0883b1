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

-- One folded batch, all or nothing, in one round trip: the partition row is locked first,
-- so a takeover waits for this commit or fences it. Returns NULL, or why it is fenced.
CREATE OR REPLACE FUNCTION commit_batch(
    p int, me text, my_epoch bigint, expected bigint, new_checkpoint bigint, relayed bigint,
    e_kind text[], e_id text[], e_state jsonb[], e_seq bigint[],
    h_seq bigint[], h_kind text[], h_id text[], h_outcome jsonb[],
    o_seq bigint[], o_n int[], o_subject text[], o_msg_id text[], o_payload bytea[],
    d_seq bigint[], d_subject text[], d_reason text[], d_payload bytea[], d_at timestamptz[]
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    current bigint;
BEGIN
    SELECT checkpoint INTO current FROM partitions
    WHERE partition = p AND owner = me AND epoch = my_epoch AND lease_until > now()
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN format('partition %s epoch %s is not ours', p, my_epoch);
    END IF;
    IF current <> expected THEN
        RETURN format('partition %s checkpoint is %s, expected %s', p, current, expected);
    END IF;
    -- Small batches are the common case when load is light: skip the empty statements.
    IF cardinality(e_kind) > 0 THEN
        INSERT INTO entities (kind, id, state, last_seq)
        SELECT * FROM unnest(e_kind, e_id, e_state, e_seq)
        ON CONFLICT (kind, id) DO UPDATE
        SET state = EXCLUDED.state, last_seq = EXCLUDED.last_seq, updated_at = now();
    END IF;
    IF cardinality(h_seq) > 0 THEN
        INSERT INTO history SELECT * FROM unnest(h_seq, h_kind, h_id, h_outcome);
    END IF;
    IF cardinality(o_seq) > 0 THEN
        INSERT INTO outbox SELECT p, * FROM unnest(o_seq, o_n, o_subject, o_msg_id, o_payload);
    END IF;
    IF cardinality(d_seq) > 0 THEN
        INSERT INTO dead_letters
        SELECT * FROM unnest(d_seq, d_subject, d_reason, d_payload, d_at);
    END IF;
    IF relayed > 0 THEN
        DELETE FROM outbox WHERE partition = p AND seq <= relayed;
    END IF;
    UPDATE partitions SET checkpoint = new_checkpoint WHERE partition = p;
    RETURN NULL;
END $$;
