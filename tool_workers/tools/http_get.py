"""`http_get`: fetch a text page from an allowlisted host (off unless enabled).

Fetching arbitrary URLs for a model is a server-side request forgery waiting to happen, so the
tool is registered only with `TIDEWIRE_HTTP_GET_ENABLED=1` and reaches only hosts named in
`TIDEWIRE_HTTP_GET_ALLOWLIST`. Redirects are followed by hand (at most 3) so every hop is
checked against the allowlist. The body is read up to a byte limit and the whole call has a
time limit.
"""

from __future__ import annotations

from urllib.parse import urljoin, urlsplit

import aiohttp

from proto.tools import HttpGetArgs
from shared import tool_catalogue
from tool_workers.registry import Tool, ToolContext, ToolError

MAX_REDIRECTS = 3


def host_allowed(host: str, allowlist: tuple[str, ...]) -> bool:
    """`example.org` allows that host only; `.example.org` allows it and its subdomains."""
    host = host.lower().rstrip(".")
    for entry in allowlist:
        entry = entry.lower().rstrip(".")
        if entry.startswith("."):
            if host == entry[1:] or host.endswith(entry):
                return True
        elif host == entry:
            return True
    return False


def _checked_url(url: str, allowlist: tuple[str, ...]) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ToolError("http_get: only http and https URLs are allowed")
    if not parts.hostname or not host_allowed(parts.hostname, allowlist):
        raise ToolError(f"http_get: host {parts.hostname or '?'!r} is not on the allowlist")
    return url


async def _read_at_most(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """Reads until `limit` bytes or the end: a huge body is never held in memory."""
    body = bytearray()
    while len(body) < limit:
        chunk = await resp.content.read(limit - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)


async def run(args: HttpGetArgs, ctx: ToolContext) -> str:
    settings = ctx.settings
    url = _checked_url(args.url, settings.http_get_allowlist)
    timeout = aiohttp.ClientTimeout(total=settings.http_get_timeout_seconds)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for _ in range(MAX_REDIRECTS + 1):
                async with session.get(url, allow_redirects=False) as resp:
                    if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                        url = _checked_url(
                            urljoin(url, resp.headers["Location"]), settings.http_get_allowlist
                        )
                        continue
                    body = await _read_at_most(resp, settings.http_get_max_bytes + 1)
                    truncated = len(body) > settings.http_get_max_bytes
                    body = body[: settings.http_get_max_bytes]
                    ctype = resp.headers.get("Content-Type", "")
                    header = f"HTTP {resp.status} {ctype}".strip()
                    if not ctype.startswith(("text/", "application/json", "application/xml")) and ctype:
                        return f"{header}; {len(body)} bytes of binary content (not shown)"
                    try:
                        text = body.decode(resp.charset or "utf-8", errors="replace")
                    except LookupError:  # a charset Python does not know
                        text = body.decode("utf-8", errors="replace")
                    return f"{header}{' (truncated)' if truncated else ''}\n{text}"
            raise ToolError(f"http_get: more than {MAX_REDIRECTS} redirects")
    except TimeoutError:
        raise ToolError(f"http_get: no answer within {settings.http_get_timeout_seconds:g} s") from None
    except aiohttp.ClientError as exc:
        raise ToolError(f"http_get: request failed ({type(exc).__name__})") from None


TOOL = Tool.implementing(tool_catalogue.HTTP_GET, run)
