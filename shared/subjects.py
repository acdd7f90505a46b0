"""Every NATS subject, stream and consumer name, and every Redis key shape, in one place.

Session ids are URL-safe tokens (no `.`, `*`, `>`), so they are safe as subject tokens.
Redis keys of one session share the hash tag `{sid}` so they live in one Redis Cluster slot
and one Lua script may touch them all.
"""

from __future__ import annotations

# ---- JetStream ------------------------------------------------------------------------------
TURNS_STREAM = "TW_TURNS"
TURNS_SUBJECTS = "tw.turns.>"
TURNS_CONSUMER = "orchestrators"
DLQ_STREAM = "TW_TURNS_DLQ"
DLQ_SUBJECTS = "tw.dlq.>"
TOOLS_STREAM = "TW_TOOLS"
TOOLS_SUBJECTS = "tw.tools.>"
ANALYTICS_STREAM = "TW_ANALYTICS"
ANALYTICS_SUBJECT = "tw.analytics.turns"
ANALYTICS_CONSUMER = "analytics-writer"
MEDIA_BUCKET = "tw_media"  # object store: uploaded media, by reference
CALLS_BUCKET = "tw_tool_calls"  # KeyValue: the tool-call ledger ("started" / "done" per call key)

# ---- core NATS (live, not persisted: the checkpoint store is the replay source) --------------
CANCEL_SUBJECT = "tw.cancel"
TOOL_CANCEL_SUBJECT = "tw.toolcancel"


def turn_subject(session_id: str) -> str:
    return f"tw.turns.{session_id}"


def dlq_subject(session_id: str) -> str:
    return f"tw.dlq.{session_id}"


def session_subject(session_id: str) -> str:
    return f"tw.session.{session_id}"


def tool_subject(pool: str) -> str:
    return f"tw.tools.{pool}"


def tool_consumer(pool: str) -> str:
    return f"tool-pool-{pool}"


def tool_result_subject(turn_id: str) -> str:
    return f"tw.toolresult.{turn_id}"


# ---- Redis keys -----------------------------------------------------------------------------
ACTIVE_LEASES = "tw:active"  # zset: session_id -> lease deadline (ms); scanned for takeover


# hash: orchestrator instance -> the URL of its health port, where peers watch it (orchestrator/peers.py)
ORCHESTRATORS = "tw:orchestrators"
# hash: orchestrator instance -> "<pickup delay ms>:<loop lag ms>:<unix ms>", read by gateways' admission
LOAD_BOARD = "tw:load"


def gateway_key(instance: str) -> str:
    """A gateway process's liveness key: its session watch-set memberships count while it exists."""
    return f"tw:gw:{instance}"


# ---- the edge: per-subject limits (shared/quotas.py) -------------------------------------------
def subject_key(subject: str, what: str) -> str:
    """A subject's `msgs` token bucket (hash) or `conns` connection slots (zset: slot -> lease deadline);
    hash-tagged by subject so one script's keys share a slot."""
    return f"tw:subject:{{{subject}}}:{what}"


# ---- model upstreams' circuit breakers (shared/breakers.py) -----------------------------------------
# zset: upstream -> "seen until" (unix ms, orchestrators' clock); the upstreams some orchestrator routes to
BREAKERS_SEEN = "tw:breakers"


def breaker_key(upstream: str) -> str:
    """Exists (JSON record, TTL = the remaining cooldown) while an orchestrator has the upstream's breaker open."""
    return f"tw:breaker:{upstream}"


# ---- protocol facades (shared/facade_store.py) ---------------------------------------------------------
def facade_idem_key(digest: str) -> str:
    """An Idempotency-Key's session (`digest` of caller, endpoint and key)."""
    return f"tw:facade:idem:{digest}"


def facade_record_key(session_id: str, turn_id: str) -> str:
    """What a facade remembers about a turn it started, beside the session's keys."""
    return rkey(session_id, f"facade:{turn_id}")


def rkey(session_id: str, name: str) -> str:
    """`seq` counter, `log` stream, `cmid` dedupe hash, `pending` turn list, `turns` requests,
    `tstate` turn states, `attempts`, `cancelled`, `lease`, `epoch`, `state`, `watch`, `hold` (the seq
    of a turn_end checkpointed but not yet committed to Postgres: readers stop before it)."""
    return f"tw:{{{session_id}}}:{name}"
