"""`python -m orchestrator`: one orchestrator process, configured by TIDEWIRE_* environment variables."""

from __future__ import annotations

import asyncio

from orchestrator.service import OrchestratorService
from orchestrator.settings import load
from shared import logs


def main() -> None:
    settings = load()
    logs.setup("orchestrator", settings.log_level)
    asyncio.run(OrchestratorService(settings).run())


if __name__ == "__main__":
    main()
