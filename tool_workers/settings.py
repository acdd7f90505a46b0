"""Settings of a tool worker process, read once from `TIDEWIRE_*` environment variables.

The same object also decides which tools a registry offers (`http_get` only when enabled,
test tools only with `TIDEWIRE_TEST_TOOLS=1`), so the orchestrator, which builds its registry
from the same environment, offers exactly the tools the workers run.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ToolWorkerSettings:
    nats_url: str = "nats://127.0.0.1:4222"
    # Pools this worker serves (`TIDEWIRE_POOLS=fast,slow`); empty = every pool of the registry.
    pools: tuple[str, ...] = ()
    # Tool runs at once, per pool: a saturated slow pool never starves the fast one.
    concurrency: int = 8
    health_port: int = 0  # 0 = no health endpoint
    host: str = "127.0.0.1"  # where the health endpoint listens (0.0.0.0 in a pod)
    http_get_enabled: bool = False
    # Exact host names, or ".example.org" for a domain and its subdomains.
    http_get_allowlist: tuple[str, ...] = ()
    http_get_max_bytes: int = 256 * 1024
    http_get_timeout_seconds: float = 8.0
    slow_lookup_seconds: float = 3.0
    # Test-only tools (flaky, send_email) are registered only when this is set.
    test_tools: bool = False
    tool_side_effect_dir: str = ""  # where send_email records what it "sent"
    log_level: str = "INFO"
    nats_timeout_seconds: float = 3.0
    # replicas of every JetStream stream, KV bucket and object store (3 on a 3-node NATS cluster)
    nats_replicas: int = 1
    # JetStream redelivers a job this long after the last sign of life of its worker.
    ack_wait_seconds: float = 2.0
    in_progress_interval_seconds: float = 0.5
    max_deliver: int = 5
    # On SIGTERM: running tools get this long to finish before they are cancelled.
    shutdown_grace_seconds: float = 10.0
    max_result_chars: int = 16_000
    # How long the call ledger remembers a call (dedupe and "not retried" answers).
    call_ledger_ttl_seconds: float = 2 * 3600.0
