"""A policy set at the deployment or tenant scope (the `feature_flags` table) governs the
gateway's sends exactly as the orchestrator reads it: the gateway resolves the same layers."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from gateway.deps import FLAG_TTL_S
from proto import client
from shared.eventlog import EventLog
from shared.flags import DEPLOYMENT_SCOPE, tenant_scope
from tests.integration.conftest import make_token
from tests.integration.wsclient import WsTestClient

SLOW = "/sim tokens=400 rate=40\n"


@pytest.mark.parametrize("scope", ["tenant", "deployment"])
async def test_double_text_policy_from_a_scope_flag_is_enforced_by_the_gateway(stack, infra, scope) -> None:
    subject = f"scoped-{uuid.uuid4().hex[:8]}"
    name = tenant_scope(subject) if scope == "tenant" else DEPLOYMENT_SCOPE
    elog = await EventLog.connect(infra.endpoints.postgres_dsn, timeout_s=5, max_size=1)
    try:
        await elog.set_flag(name, "double_text_policy", "reject")
        await asyncio.sleep(FLAG_TTL_S + 0.3)  # a scope read before the flip may be cached this long
        async with WsTestClient(stack.url, make_token(subject)) as c:
            await c.connect()
            first = await c.ack_for(await c.send_message(SLOW + "first"))
            await c.until(lambda f: isinstance(f, client.Delta), 30, "the first turn's first delta")
            cmid = await c.send_message("second")
            err = await c.until(
                lambda f: (
                    isinstance(f, client.Error) or (isinstance(f, client.Ack) and f.client_msg_id == cmid)
                ),
                15,
                "the answer to the second send",
            )
            assert isinstance(err, client.Error) and err.code == "conflict", (
                f"a second send during a running turn under a {scope}-scope reject was not refused: {err}"
            )
            await c.send({"type": "stop", "turn_id": first.turn_id})
            await c.until_turn_end(first.turn_id, 30)
    finally:
        await elog.set_flag(name, "double_text_policy", None)
        await elog.close()
