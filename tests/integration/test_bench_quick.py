"""Smoke test of `make bench-quick`: the whole benchmark runs end to end and writes sane results.

No speed assertions (the machine is shared and noisy): only that every scenario ran, that the JSON has
the expected shape, that the figures are finite and positive, and that the plots were drawn.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.waits import run_process

REPO = Path(__file__).resolve().parents[2]


def _finite_positive(value: Any, what: str) -> None:
    assert isinstance(value, int | float), f"{what} is not a number: {value!r}"
    assert math.isfinite(value) and value > 0, f"{what} is not finite and positive: {value!r}"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "results"
    docs_before = (
        (REPO / "docs" / "benchmarks.md").read_bytes() if (REPO / "docs" / "benchmarks.md").exists() else None
    )
    proc = run_process(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=170,
        what="bench.run --quick",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = list(out.glob("*.json"))
    assert len(files) == 1, files
    results = json.loads(files[0].read_text())

    assert {"meta", "targets", "scenarios", "summary"} <= results.keys()
    meta = results["meta"]
    assert meta["mode"] == "quick"
    assert meta["machine"]["logical_cores"] >= 1
    assert meta["machine"]["python"].startswith("3.")
    scenarios = results["scenarios"]
    for name in ("ttft", "idle", "throughput", "crash", "storm"):
        assert name in scenarios, name
        assert "error" not in scenarios[name], (name, scenarios[name]["error"])

    for level in scenarios["ttft"]["levels"]:
        for who in ("tidewire", "baseline"):
            stats = level[who]["ttft_ms"]
            assert stats["n"] > 0
            for q in ("p50", "p99", "p99_9"):
                _finite_positive(stats[q], f"ttft {who} {level['sessions']} {q}")
        _finite_positive(level["ratio_p50"], "ttft ratio")

    idle = scenarios["idle"]
    assert idle["ws_opened"] > 0 and idle["sse_opened"] > 0
    for key in (
        "ws_kib_per_conn",
        "ws_fds_per_conn",
        "sse_kib_per_conn",
        "sse_fds_per_conn",
        "baseline_ws_kib_per_conn",
    ):
        _finite_positive(idle[key], f"idle {key}")
    assert idle["ws_idle_cpu_pct"]["gateway"] >= 0

    tp = scenarios["throughput"]
    for case in ("tokens", "batched", "baseline"):
        assert tp[case]["turns_ok"] > 0, case
        _finite_positive(tp[case]["tokens_per_s"], f"throughput {case} tokens/s")
        _finite_positive(tp[case]["tokens_per_cpu_s"], f"throughput {case} tokens per CPU-second")

    crash = scenarios["crash"]
    assert crash["killed_trials"] >= 1
    _finite_positive(crash["pause_ms"]["p50"], "crash pause p50")

    storm = scenarios["storm"]
    assert storm["resumed"] > 0
    _finite_positive(storm["resume_s"]["p50"], "storm resume p50")

    assert results["summary"] and all("metric" in row for row in results["summary"])
    assert len(list(out.glob("*.png"))) >= 4
    after = (
        (REPO / "docs" / "benchmarks.md").read_bytes() if (REPO / "docs" / "benchmarks.md").exists() else None
    )
    assert after == docs_before, "a quick run with --out must not rewrite docs/benchmarks.md"
