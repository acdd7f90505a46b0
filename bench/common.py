"""Coordinator-side helpers shared by `bench.run`, `bench.report` and the scenario modules.

They live apart from `bench.run` so that a scenario module never imports the coordinator's entry point
(`python -m bench.run` runs it as `__main__`; importing it again would load a second copy).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def r3(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, 3)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b <= 0:
        return None
    return round(a / b, 2)


def dig(d: Any, *path: Any) -> Any:
    """`d[p0][p1]...`, None as soon as a step is missing."""
    for p in path:
        if isinstance(d, dict):
            d = d.get(p)
        elif isinstance(d, list) and isinstance(p, int) and -len(d) <= p < len(d):
            d = d[p]
        else:
            return None
    return d


def at_most(v: Any, t: float) -> bool | None:
    return None if not isinstance(v, int | float) else v <= t


class Rows(list[dict[str, Any]]):
    """Rows of the docs table (`results["summary"]`), each scenario module adding its own."""

    def add(
        self,
        metric: str,
        value: Any,
        unit: str,
        target: str = "",
        met: bool | None = None,
        floor: Any = None,
        note: str = "",
    ) -> None:
        self.append(
            {
                "metric": metric,
                "value": value,
                "unit": unit,
                "target": target,
                "met": met,
                "floor": floor,
                "ratio": ratio(value, floor) if isinstance(value, int | float) else None,
                "note": note,
            }
        )
