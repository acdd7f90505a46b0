"""The coordinator's outputs: the rows of the docs table (`build_summary`), the table itself, the docs
section it lives in, the plots, and `python -m bench.run --render` (all of these again from a JSON).

Each scenario module brings its own rows and plot; this module puts them in order.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

from bench.common import Rows, log
from bench.scenarios import ORDER, crash, idle, openloop, storm, throughput, ttft

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
PLOTTED = {"ttft": ttft, "idle": idle, "throughput": throughput, "crash": crash, "storm": storm}


def clean(o: Any) -> Any:
    """JSON-safe: non-finite floats become null, tuples lists, keys strings."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): clean(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [clean(v) for v in o]
    return o


def build_summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of the docs table: metric, target, tidewire, floor, ratio, met."""
    # the canary rows come before the storm's: the row order is part of the table's format
    return [
        *ttft.summary_rows(results),
        *idle.summary_rows(results),
        *throughput.summary_rows(results),
        *crash.summary_rows(results),
        *canary_rows(results),
        *storm.summary_rows(results),
    ]


def canary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """A row for every scenario after which the stack no longer answered."""
    s = results["scenarios"]
    rows = Rows()
    for name in ORDER:
        sc = s.get(name)
        canary = sc.get("canary_after") if isinstance(sc, dict) else None
        if isinstance(canary, dict) and not canary.get("ok"):
            rows.add(
                f"Stack still serving turns after the {name} scenario (1 session, 3 turns, 15 s timeout)",
                "no",
                "",
                "yes",
                False,
                note="a fresh stack (new infra state, new processes) ran the next scenario; "
                + ", ".join(f"{k} ×{v}" for k, v in (canary.get("error_kinds") or {}).items()),
            )
    return rows


def fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if abs(v) >= 1000:
            s = f"{v:,.0f}"
        elif abs(v) >= 100:
            s = f"{v:.0f}"
        elif abs(v) >= 10:
            s = f"{v:.1f}"
        else:
            s = f"{v:.2f}"
    elif isinstance(v, int):
        s = f"{v:,}"
    else:
        s = str(v)
    return f"{s} {unit}".strip() if unit and unit not in ("%",) else (s + unit if unit else s)


def render_table(results: dict[str, Any], json_rel: str, plots_rel: list[str]) -> str:
    m = results["meta"]
    mc = m["machine"]
    lines = [
        f"Last run: **{m['date']}** ({m['mode']} mode, {m['duration_s']:.0f} s), commit `{mc['git_commit']}`. "
        f"Machine: {mc['cpu_model']}, {mc['logical_cores']} logical cores, {mc['memory_gib']} GiB RAM, "
        f"{mc['os']}, {mc['implementation']} {mc['python']}, aiohttp {mc['aiohttp']}. Everything (load generator, "
        "gateway, orchestrators, tool worker, NATS, Postgres, Redis, the floor) shares this machine.",
        "",
        "| Metric | Target | tidewire | Floor (bare relay) | × floor | Met? | Notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["summary"]:
        met = {True: "✅", False: "❌", None: ""}[r["met"]]
        lines.append(
            f"| {r['metric']} | {r['target']} | {fmt(r['value'], r['unit'])} | "
            f"{fmt(r['floor'], r['unit']) if r['floor'] is not None else ''} | "
            f"{fmt(r['ratio']) + '×' if r['ratio'] is not None else ''} | {met} | {r['note']} |"
        )
    busy = [
        f"{k} {v['machine_busy_pct']:.0f}%"
        for k, v in results["scenarios"].items()
        if isinstance(v, dict) and isinstance(v.get("machine_busy_pct"), int | float)
    ]
    if busy:
        lines += [
            "",
            "Machine-wide CPU busy during each scenario (every process on the box, ours or not): "
            + ", ".join(busy)
            + ".",
        ]
    errors = {k: v["error"] for k, v in results["scenarios"].items() if isinstance(v, dict) and "error" in v}
    if errors:
        lines += [
            "",
            "Scenarios that failed in this run: "
            + "; ".join(f"**{k}**: `{v[:200]}`" for k, v in errors.items()),
        ]
    lines += ["", f"Raw results: [`{json_rel}`]({json_rel})."]
    if plots_rel:
        lines += ["", " ".join(f"![{Path(p).stem}]({p})" for p in plots_rel)]
    return "\n".join(lines)


def update_docs(path: Path, table: str) -> None:
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n## Results\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def plot(results: dict[str, Any], samples: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    written: list[Path] = []
    s = results["scenarios"]

    def save(fig: Any, name: str) -> None:
        path = out_dir / f"{stem}-{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    for name, module in PLOTTED.items():
        with contextlib.suppress(Exception):
            fig = module.plot(plt, s, samples)
            if fig is not None:
                save(fig, name)
    with contextlib.suppress(Exception):
        written += openloop.plot(s.get("openloop"), out_dir, stem)
    return written


def render_only(json_path: Path, docs: Path | None) -> int:
    """Rebuilds the summary inside the results JSON and, unless `docs` is None, the docs table."""
    results = json.loads(json_path.read_text())
    results["summary"] = build_summary(results)
    json_path.write_text(json.dumps(clean(results), indent=2, ensure_ascii=False) + "\n")
    plots = sorted(p for p in json_path.parent.glob(f"{json_path.stem}-*.png"))
    order = {name: i for i, name in enumerate(ORDER)}
    plots.sort(key=lambda p: order.get(p.stem.rsplit("-", 1)[-1], 99))
    if docs is None:
        log(f"rewrote the summary of {json_path}")
        return 0
    rel = lambda p: os.path.relpath(p, docs.parent)  # noqa: E731
    update_docs(docs, render_table(results, rel(json_path), [rel(p) for p in plots]))
    log(f"rewrote the summary of {json_path} and the table of {docs}")
    return 0
