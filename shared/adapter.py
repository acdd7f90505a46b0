"""What every I/O adapter is: an async context manager that closes what it opened. A service starts
its adapters under one `contextlib.AsyncExitStack`, so a start-up that fails half way closes what it
had opened already, and a shutdown closes everything in the reverse order of opening."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Adapter:
    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
