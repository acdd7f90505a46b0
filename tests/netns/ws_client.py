"""A WebSocket client run inside a network namespace (`ip netns exec`): it says hello, sends one
message, and prints every server frame as one JSON line on stdout until it is killed, so the test
outside the namespace sees exactly what the client saw before its network vanished."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid

import aiohttp


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--text", required=True)
    args = ap.parse_args()
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(
            f"{args.url}?access_token={args.token}", timeout=aiohttp.ClientWSTimeout(ws_close=5)
        ) as ws,
    ):
        await ws.send_str(json.dumps({"type": "hello"}))
        sent = False
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            sys.stdout.write(msg.data + "\n")
            sys.stdout.flush()
            if not sent and json.loads(msg.data).get("type") == "ready":
                await ws.send_str(
                    json.dumps({"type": "send", "client_msg_id": uuid.uuid4().hex, "text": args.text})
                )
                sent = True


if __name__ == "__main__":
    asyncio.run(main())
