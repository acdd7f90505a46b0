"""Gateway settings, read once from `TIDEWIRE_*` environment variables (see the README table)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.config import from_env


@dataclass(frozen=True)
class GatewaySettings:
    nats_url: str = "nats://127.0.0.1:4222"
    postgres_dsn: str = "postgresql://postgres@127.0.0.1:5432/tidewire"
    redis_url: str = "redis://127.0.0.1:6379/0"
    host: str = "127.0.0.1"
    http_port: int = 8080
    gateway_id: str = ""
    # auth
    jwt_secret: str = "tidewire-dev-secret-change-me-in-production"
    jwt_issuer: str = "tidewire"
    jwt_audience: str = "tidewire"
    jwks_file: str = ""
    allowed_origins: tuple[str, ...] = ()
    # timeouts (seconds) on each network hop
    redis_timeout_s: float = 2.0
    postgres_timeout_s: float = 5.0
    nats_timeout_s: float = 3.0
    # limits
    max_frame_bytes: int = 64 * 1024
    max_text_chars: int = 32_000
    max_sessions_per_subject: int = 1000
    ws_heartbeat_s: float = 15.0
    ws_heartbeat_timeout_s: float = 10.0
    sse_heartbeat_s: float = 15.0
    outbound_max_frames: int = 512
    outbound_max_chars: int = 1_000_000
    msg_rate_per_s: float = 5.0
    msg_burst: int = 20
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
