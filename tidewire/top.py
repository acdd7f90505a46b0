"""`tidewire top`: a live terminal view of the local stack's metrics, refreshed every second.

Scrapes the Prometheus `/metrics` endpoints of the stack (by default the `"metrics"` list that
`tidewire dev` writes into `.tidewire/dev.json`, else the gateway's `"url"` + `/metrics`), sums
them, and shows what an on-call engineer looks at first: TTFT p50/p99 and where it goes (per
stage), sockets, turn-queue depth, turn/cancel/degraded rates, orphaned upstream streams, fencing
events and dead letters. Rates and "now" quantiles come from the difference between two scrapes;
before the second scrape (or when nothing happened in between) quantiles are since start. When
`tidewire dev` is supervising the stack, its `dev-status.json` adds one line per service: pid,
state, restarts and the last exit (`tidewire dev status` prints the same table once).

Only the standard library and `shared.promtext` (the one Prometheus reader): it must run anywhere
the stack runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from shared import promtext

Samples = promtext.Exposition

STAGES = (
    "gateway_accept",
    "checkpoint_append_user",
    "eventlog_append",
    "publish",
    "queue_wait",
    "session_fetch",
    "context_pack",
    "retrieval",
    "model_queue",
    "upstream_first_token",
)


def parse(text: str) -> Samples:
    """A page as `tidewire top` reads it: a malformed line is skipped, not fatal (a live view)."""
    return promtext.parse(text, strict=False)


def total(page: Samples, name: str, **match: str) -> float:
    """The sum over every series of `name` whose labels include `match` (0 when none does)."""
    return math.fsum(s.value for s in page.select(name, **match))


def maximum(pages: Iterable[Samples], name: str) -> float | None:
    values = [s.value for page in pages for s in page.select(name)]
    return max(values) if values else None


def quantile(q: float, page: Samples, before: Samples | None, name: str, **match: str) -> float | None:
    """`histogram_quantile` over what happened since `before` (when anything did), else since start;
    None when there is no answer."""
    h = page.histogram(name, **match)
    if h is None:
        return None
    if before is not None:
        window = h.since(before.histogram(name, **match))
        if window.count > 0:
            h = window
    v = h.quantile(q)
    return None if math.isnan(v) else v


def _ms(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v * 1000:.0f} ms" if v < 10 else f"{v:.1f} s"


def render(
    now: list[Samples | None],
    before: list[Samples | None] | None,
    dt: float,
    targets: list[str],
    status: Mapping[str, Any] | None = None,
) -> str:
    """One refresh, from this scrape and the previous one (pure: testable without servers)."""
    up = [s for s in now if s is not None]
    cur = promtext.merge(up)
    prev = promtext.merge(s for s in (before or []) if s is not None) if before else None

    def rate(name: str, **match: str) -> str:
        if prev is None or dt <= 0:
            return "—"
        return f"{max(0.0, total(cur, name, **match) - total(prev, name, **match)) / dt:.1f}/s"

    def q(name: str, qq: float, **match: str) -> float | None:
        return quantile(qq, cur, prev, name, **match)

    out = [f"tidewire top — {time.strftime('%H:%M:%S')} — {len(up)}/{len(targets)} endpoints up"]
    for target, snap in zip(targets, now, strict=True):
        if snap is None:
            out.append(f"  DOWN {target}")
    ttft_n = total(cur, "tidewire_ttft_seconds_count")
    out += [
        "",
        f"TTFT (gateway receipt → first byte)  p50 {_ms(q('tidewire_ttft_seconds', 0.5)):>9}   "
        f"p99 {_ms(q('tidewire_ttft_seconds', 0.99)):>9}   turns measured {ttft_n:.0f}",
        f"sockets {total(cur, 'tidewire_gateway_sockets'):.0f}   SSE streams {total(cur, 'tidewire_gateway_sse_streams'):.0f}"
        f"   turn queue {_fmt_opt(maximum(up, 'tidewire_turn_queue_pending'))}"
        f" (waiting {_fmt_opt(maximum(up, 'tidewire_turn_queue_waiting'))})"
        f"   sessions owned {total(cur, 'tidewire_orchestrator_sessions_owned'):.0f}",
        f"turns {rate('tidewire_turn_seconds_count')}   sends {rate('tidewire_gateway_sends')}"
        f"   cancels {rate('tidewire_gateway_cancel_requests')} (succeeded {rate('tidewire_orchestrator_cancel_success')})"
        f"   degraded {rate('tidewire_gateway_degraded')}   reconnects {rate('tidewire_gateway_reconnects')}",
        f"upstream orphaned {total(cur, 'tidewire_upstream_orphaned'):.0f}"
        f"   aborted {total(cur, 'tidewire_upstream_aborted'):.0f}"
        f"   lease lost {total(cur, 'tidewire_orchestrator_lease_lost'):.0f}"
        f"   stale rejections {total(cur, 'tidewire_orchestrator_stale_rejections'):.0f}"
        f"   dead letters {_fmt_opt(maximum(up, 'tidewire_dead_letter_messages'))}"
        f"   tool timeouts {total(cur, 'tidewire_orchestrator_tool_timeouts'):.0f}",
        "",
        f"{'stage':<24}{'p50':>10}{'p99':>10}{'count':>9}",
    ]
    for stage in STAGES:
        n = total(cur, "tidewire_turn_stage_seconds_count", stage=stage)
        if n == 0:
            continue
        out.append(
            f"{stage:<24}{_ms(q('tidewire_turn_stage_seconds', 0.5, stage=stage)):>10}"
            f"{_ms(q('tidewire_turn_stage_seconds', 0.99, stage=stage)):>10}{n:>9.0f}"
        )
    for name, label in (
        ("tidewire_checkpoint_append_seconds", "checkpoint append"),
        ("tidewire_tool_call_seconds", "tool call"),
    ):
        n = total(cur, name + "_count")
        if n:
            out.append(f"{label:<24}{_ms(q(name, 0.5)):>10}{_ms(q(name, 0.99)):>10}{n:>9.0f}")
    if status is not None:
        out += ["", *render_services(status)]
    return "\n".join(out)


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def render_services(status: Mapping[str, Any], now: float | None = None) -> list[str]:
    """The supervisor's view (`dev-status.json`, written by `tidewire dev`): one line per service."""
    now = time.time() if now is None else now
    updated = float(status.get("updated_at") or 0.0)
    head = f"supervisor pid {status.get('supervisor_pid')} — {status.get('state', '?')}"
    if status.get("state") == "running" and now - updated > 10:
        head += f" — status not refreshed for {_ago(now - updated)} (is `tidewire dev` still running?)"
    out = [head, f"{'service':<18}{'pid':>8}  {'state':<13}{'up':>6}{'restarts':>10}  last exit"]
    services = status.get("services")
    for name, svc in services.items() if isinstance(services, Mapping) else []:
        up_since = svc.get("up_since")
        up = _ago(now - float(up_since)) if up_since else "—"
        state = str(svc.get("state", "?"))
        if state == "backoff" and svc.get("next_restart_in_s") is not None:
            state = f"backoff {float(svc['next_restart_in_s']):.1f}s"
        last = svc.get("last_exit") or "—"
        if svc.get("last_exit_at"):
            last += f" ({_ago(now - float(svc['last_exit_at']))} ago)"
        out.append(
            f"{name:<18}{svc.get('pid') or '—':>8}  {state:<13}{up:>6}{svc.get('restarts', 0):>10}  {last}"
        )
    return out


def load_status(path: Path) -> dict[str, Any] | None:
    """The status file, or None when there is none (no supervisor) or it cannot be read."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _fmt_opt(v: float | None) -> str:
    return "—" if v is None else f"{v:.0f}"


def scrape(url: str, timeout: float = 2.0) -> Samples | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return parse(r.read().decode())
    except Exception:  # noqa: BLE001 - a down endpoint is shown as DOWN
        return None


def targets_from(config: Mapping[str, object]) -> list[str]:
    metrics = config.get("metrics")
    if isinstance(metrics, list) and metrics:
        return [str(m) for m in metrics]
    url = config.get("url")
    return [str(url).rstrip("/") + "/metrics"] if url else []


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tidewire top", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--metrics",
        action="append",
        default=[],
        help="a /metrics URL to scrape (repeat for several; default: .tidewire/dev.json)",
    )
    p.add_argument("--url", help="gateway base URL (its /metrics is scraped)")
    p.add_argument("--state-dir", default=".tidewire", help="where `tidewire dev` wrote dev.json")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.add_argument("--once", action="store_true", help="print one view (two scrapes) and exit")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    targets = list(args.metrics)
    if args.url:
        targets.append(args.url.rstrip("/") + "/metrics")
    if not targets:
        cfg = Path(args.state_dir) / "dev.json"
        if not cfg.exists():
            p.error(f"no --metrics/--url given and no {cfg} (run `tidewire dev` first)")
        targets = targets_from(json.loads(cfg.read_text()))
    if not targets:
        p.error("no metrics endpoints to scrape")
    status_path = Path(args.state_dir) / "dev-status.json"
    pool = ThreadPoolExecutor(max_workers=min(16, len(targets)))
    before: list[Samples | None] | None = None
    last = time.monotonic()
    try:
        while True:
            now = list(pool.map(scrape, targets))
            t = time.monotonic()
            if args.once and before is None:
                before, last = now, t
                time.sleep(args.interval)
                continue
            view = render(now, before, t - last, targets, load_status(status_path))
            if args.once:
                print(view)
                return
            sys.stdout.write("\x1b[H\x1b[2J" + view + "\n")
            sys.stdout.flush()
            before, last = now, t
            time.sleep(max(0.0, args.interval - (time.monotonic() - t)))
    except KeyboardInterrupt:
        pass
    finally:
        pool.shutdown(wait=False)


if __name__ == "__main__":
    main()
