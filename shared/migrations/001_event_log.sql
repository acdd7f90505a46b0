-- The append-only event log. Rows are never updated except turns.status/text at turn end.
CREATE TABLE IF NOT EXISTS sessions (
    session_id  text PRIMARY KEY,
    subject     text NOT NULL,
    title       text,
    flags       jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS sessions_by_subject ON sessions (subject, created_at DESC);

-- One row per sequenced event, except that a turn's consecutive deltas are stored as one merged
-- delta row (seq = last member, first_seq = first member); mark_seqs/mark_ends keep each member's
-- seq and end offset so a replay can resume exactly inside a merged row.
CREATE TABLE IF NOT EXISTS events (
    session_id    text   NOT NULL REFERENCES sessions (session_id),
    seq           bigint NOT NULL,
    first_seq     bigint NOT NULL,
    type          text   NOT NULL,
    turn_id       text,
    client_msg_id text,
    payload       text   NOT NULL,
    mark_seqs     bigint[],
    mark_ends     integer[],
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, seq)
);
CREATE UNIQUE INDEX IF NOT EXISTS events_client_msg_id ON events (session_id, client_msg_id)
    WHERE client_msg_id IS NOT NULL;

-- The assistant message of each turn, written once at turn end.
CREATE TABLE IF NOT EXISTS turns (
    turn_id     text PRIMARY KEY,
    session_id  text NOT NULL REFERENCES sessions (session_id),
    user_seq    bigint NOT NULL,
    end_seq     bigint NOT NULL,
    status      text NOT NULL,
    text        text NOT NULL,
    epoch       bigint NOT NULL,
    flags       jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS turns_by_session ON turns (session_id, end_seq);
