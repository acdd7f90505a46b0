"""`python -m orchestrator`: one orchestrator process, configured by TIDEWIRE_* environment variables."""

from __future__ import annotations

from orchestrator.service import OrchestratorService
from orchestrator.settings import load
from shared import logs, runtime


def main() -> None:
    settings = load()
    logs.setup("orchestrator", settings.log_level)
    runtime.run(OrchestratorService(settings).run())


if __name__ == "__main__":
    main()
