"""Every retry policy of tidewire, named, in one place (tenacity).

A retry is a decision about idempotency, so each policy says what it may repeat and why that is
safe; call sites pick one by name instead of composing tenacity parts inline. Each function returns
a fresh `AsyncRetrying` (they hold per-run state): `async for attempt in policy(): with attempt:`
or `await policy()(fn, *args)`.
"""

from __future__ import annotations

from collections.abc import Callable

import nats.errors
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
    wait_fixed,
    wait_random_exponential,
)

__all__ = [
    "analytics_publish_retry",
    "model_step_retry",
    "startup_connect_retry",
    "tool_publish_retry",
    "transient_tool_retry",
]


def tool_publish_retry() -> AsyncRetrying:
    """A ToolJob publish. Safe: `Nats-Msg-Id` makes JetStream keep only one copy."""
    return AsyncRetrying(
        retry=retry_if_exception_type((nats.errors.TimeoutError, nats.errors.NoRespondersError)),
        stop=stop_after_attempt(3),
        wait=wait_random_exponential(multiplier=0.1, max=1.0),
        reraise=True,
    )


def analytics_publish_retry() -> AsyncRetrying:
    """Three tries within about a second: rides out a NATS reconnect, gives up on an outage (the
    batch is deduplicated by its message id, so a repeat is harmless)."""
    return AsyncRetrying(
        stop=stop_after_attempt(3),
        wait=wait_exponential_jitter(multiplier=0.1, max=0.5, jitter=0.1),
        reraise=True,
    )


def model_step_retry(retryable: Callable[[BaseException], bool]) -> AsyncRetrying:
    """One model call of a turn, re-asked only while `retryable` says so (before the first token:
    nothing was shown, so a new stream cannot repeat text; orchestrator/turn.py decides)."""
    return AsyncRetrying(
        retry=retry_if_exception(retryable),
        stop=stop_after_attempt(3),
        wait=wait_exponential_jitter(initial=0.05, max=1.0),
        reraise=True,
    )


def transient_tool_retry(retry_on: type[BaseException]) -> AsyncRetrying:
    """`retry_on` inside one run of an IDEMPOTENT tool (never others). The tool's time limit still
    bounds the whole run, retries included."""
    return AsyncRetrying(
        retry=retry_if_exception_type(retry_on),
        stop=stop_after_attempt(4),
        wait=wait_random_exponential(multiplier=0.1, max=1.0),
        reraise=True,
    )


def startup_connect_retry() -> AsyncRetrying:
    """Start-up only: a broker may come up after us (compose, k8s); give it half a minute."""
    return AsyncRetrying(
        retry=retry_if_exception_type(Exception),
        stop=stop_after_delay(30),
        wait=wait_fixed(0.5),
        reraise=True,
    )
