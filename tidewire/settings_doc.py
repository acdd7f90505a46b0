"""Renders the configuration tables of the README from the services' settings classes, so the
documented variables and defaults are the ones the code reads (`make docs`; a unit test checks it)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"


def render() -> str:
    from gateway.settings import GatewaySettings
    from orchestrator.settings import OrchestratorSettings
    from tool_workers.settings import ToolWorkerSettings

    out: list[str] = []
    for title, cls in (
        ("gateway", GatewaySettings),
        ("orchestrator", OrchestratorSettings),
        ("tool_workers", ToolWorkerSettings),
    ):
        out += [f"**`python -m {title}`**", "", "| variable | default |", "|---|---|"]
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = ""
            shown = "" if default in ("", ()) else str(default)
            out.append(
                f"| `TIDEWIRE_{f.name.upper()}` | `{shown}` |"
                if shown
                else f"| `TIDEWIRE_{f.name.upper()}` | |"
            )
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def update(readme: Path) -> bool:
    text = readme.read_text()
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), BEGIN + "\n" + render() + END, text, flags=re.S)
    if new != text:
        readme.write_text(new)
        return True
    return False


if __name__ == "__main__":
    update(Path(__file__).resolve().parents[1] / "README.md")
