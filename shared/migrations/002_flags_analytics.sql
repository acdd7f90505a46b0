-- Feature flags per scope ('deployment', 'tenant:<id>', 'session:<id>') and per-turn analytics.
CREATE TABLE IF NOT EXISTS feature_flags (
    scope       text NOT NULL,
    name        text NOT NULL,
    value       jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, name)
);

CREATE TABLE IF NOT EXISTS turn_analytics (
    turn_id           text PRIMARY KEY,
    session_id        text NOT NULL,
    status            text NOT NULL,
    ttft_ms           double precision,
    duration_ms       double precision NOT NULL,
    completion_chars  integer NOT NULL,
    tool_calls        integer NOT NULL,
    recorded_at       timestamptz NOT NULL DEFAULT now()
);
