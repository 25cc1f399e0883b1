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
