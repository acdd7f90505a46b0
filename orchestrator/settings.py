"""Orchestrator settings, read once from `TIDEWIRE_*` environment variables (see the README table)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.config import from_env


@dataclass(frozen=True)
class OrchestratorSettings:
    nats_url: str = "nats://127.0.0.1:4222"
    postgres_dsn: str = "postgresql://postgres@127.0.0.1:5432/tidewire"
    redis_url: str = "redis://127.0.0.1:6379/0"
    orchestrator_id: str = ""
    health_port: int = 0
    # where peers reach this process's health port to watch it (orchestrator/peers.py); default
    # http://<host>:<health_port> (127.0.0.1 when bound to every address: set the pod IP in k8s)
    advertise_url: str = ""
    host: str = "127.0.0.1"
    # timeouts (seconds) on each network hop
    redis_timeout_s: float = 2.0
    # Redis replicas that must confirm (WAIT) each checkpoint write before it is shown: 0 with one
    # Redis; 1 or more behind Sentinel, where replication is asynchronous (docs/cluster.md)
    redis_min_replicas: int = 0
    postgres_timeout_s: float = 5.0
    nats_timeout_s: float = 3.0
    # replicas of every JetStream stream, KV bucket and object store (3 on a 3-node NATS cluster)
    nats_replicas: int = 1
    # ownership: a lease renewed by the owner and watched by the others. A dead owner is noticed at
    # once through the peer link; the TTL only bounds the pause after a freeze or a partition, and
    # must outlast the worst event-loop lag under overload (300 ms lost leases to lag, PERF-LEDGER §5)
    lease_ttl_ms: int = 2000
    lease_renew_ms: int = 500
    takeover_scan_ms: int = 250
    max_sessions: int = 256
    max_turn_attempts: int = 3
    max_turn_starts: int = 12
    turn_timeout_s: float = 600.0
    max_tool_steps: int = 4
    # how long a checkpoint batch waits for more events before its append (a Redis round trip and
    # a NATS message): a step's first text, status lines and flushes never wait (checkpoint_writer.py)
    checkpoint_linger_ms: int = 25
    # model
    provider: str = "simulated"
    system_prompt: str = "You are a helpful assistant."
    context_budget_tokens: int = 8000
    window_messages: int = 64
    # policies (per deployment; a session flag overrides them)
    disconnect_policy: str = "continue"
    session_ttl_s: float = 86_400.0
    log_level: str = "INFO"
    # fault injection for tests only: a turn whose text contains this marker raises inside the
    # turn loop (an orchestrator bug, not a model error), to exercise retries and dead-lettering
    fault_poison_marker: str = ""
    # fault injection for tests only: the first start of a turn whose text contains this marker
    # SIGKILLs its orchestrator between checkpointing turn_end and committing the turn to Postgres
    fault_kill_before_commit: str = ""


def load() -> OrchestratorSettings:
    return from_env(OrchestratorSettings)
