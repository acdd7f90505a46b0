"""Gateway settings, read once from `TIDEWIRE_*` environment variables (see the README table).

The edge limits (frame size, per-connection and per-subject rates, connections per subject, load
shedding) are tuned separately; docs/security.md has the table of what each one does when exceeded.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.config import from_env

DEV_JWT_SECRET = "tidewire-dev-secret-change-me-in-production"


@dataclass(frozen=True)
class GatewaySettings:
    nats_url: str = "nats://127.0.0.1:4222"
    postgres_dsn: str = "postgresql://postgres@127.0.0.1:5432/tidewire"
    redis_url: str = "redis://127.0.0.1:6379/0"
    host: str = "127.0.0.1"
    http_port: int = 8080
    gateway_id: str = ""
    # auth
    jwt_secret: str = (
        DEV_JWT_SECRET  # HS256; "" disables HS256 (and with a JWKS file the dev secret is ignored)
    )
    jwt_issuer: str = "tidewire"
    jwt_audience: str = "tidewire"
    jwt_leeway_s: float = 30.0  # clock skew allowed on exp / nbf / iat
    jwks_file: str = ""  # RS256 / ES256 public keys (JWKS JSON), re-read when the file changes
    allowed_origins: tuple[str, ...] = ()  # browser Origins allowed besides the gateway's own ("*" = any)
    # TLS: both set = the gateway serves HTTPS / WSS itself
    tls_cert: str = ""
    tls_key: str = ""
    # timeouts (seconds) on each network hop
    redis_timeout_s: float = 2.0
    # Redis replicas that must confirm (WAIT) each checkpoint write before it is shown: 0 with one
    # Redis; 1 or more behind Sentinel, where replication is asynchronous (docs/cluster.md)
    redis_min_replicas: int = 0
    postgres_timeout_s: float = 5.0
    nats_timeout_s: float = 3.0
    # replicas of every JetStream stream, KV bucket and object store (3 on a 3-node NATS cluster)
    nats_replicas: int = 1
    # limits
    max_frame_bytes: int = 64 * 1024
    max_text_chars: int = 32_000
    max_sessions_per_subject: int = 1000
    ws_heartbeat_s: float = 15.0
    ws_heartbeat_timeout_s: float = 10.0
    sse_heartbeat_s: float = 15.0
    outbound_max_frames: int = 512
    outbound_max_chars: int = 1_000_000
    # per connection (in process): messages (`send`) and frames of any kind
    msg_rate_per_s: float = 5.0
    msg_burst: int = 20
    frame_rate_per_s: float = 50.0
    frame_burst: int = 200
    # per subject, across every gateway (Redis)
    subject_msg_rate_per_s: float = 10.0
    subject_msg_burst: int = 40
    max_connections_per_subject: int = 256  # WebSocket + SSE + long-poll requests open at once
    connection_lease_s: float = 60.0  # a dead gateway's connections stop counting after this
    limits_timeout_s: float = 0.5  # a connection-slot release that takes longer is skipped (fail open)
    # load shedding: new sends are refused with `degraded` while the turn queue is this deep
    # (0 = always shed, negative = never) or a dependency is down; sampled in the background
    turn_queue_shed_threshold: int = 5000
    shed_sample_ms: int = 250
    # admission by measured delay: new sends are refused while the median orchestrator's recent
    # pickup delay (receipt -> turn start) or loop lag, or this gateway's own loop lag, exceeds these
    # (negative = never); orchestrators report twice a second (orchestrator/load.py). Off by default:
    # in the cluster drill a NATS node's death (JetStream leader election) pushed pickup delays past
    # 1 s and the gateways then refused sends for 24 s; e.g. 1000 / 500 on a single-node broker
    shed_pickup_delay_ms: int = -1
    shed_loop_lag_ms: int = -1
    # delay-based shedding (gateway/shedding.py, on by default): while even the quickest turns wait
    # longer than this to start (receipt -> pickup), a growing fraction of new sends is refused
    # with `degraded`, about the excess over capacity (negative = off)
    shed_target_delay_ms: int = 250
    shed_retry_after_ms: int = 2000
    receive_yield_every: int = 16  # the receive loop yields to the event loop every N frames
    # behaviour
    double_text_policy: str = "queue"
    drain_seconds: float = 20.0
    dev_mode: bool = False
    log_level: str = "INFO"
    log_message_text: bool = False
    session_ttl_s: float = 86_400.0
    # fault injection for tests only: SIGKILL this process after the user message is durable,
    # before the ack is sent, when the message text contains this marker
    fault_kill_after_persist: str = ""


def load() -> GatewaySettings:
    return from_env(GatewaySettings)
