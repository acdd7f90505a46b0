"""Edge protection on a live stack: authentication (HS256, RS256 / ES256 from a JWKS file, the JWT
attacks), ownership on every path, the Origin allowlist, token expiry on a live socket, each limit
triggering with its error and recovering, load shedding answering at once, and TLS.

The stacks here run gateways only (no orchestrator), so nothing but the edge is measured; a turn
sent here waits in JetStream for whichever orchestrator comes next.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from proto import client
from shared import tokens
from tests.integration.conftest import SECRET, make_token, stack_env
from tests.integration.wsclient import WsTestClient
from tests.waits import eventually, within
from tidewire.dev.stack import Stack, free_port

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ALLOWED_ORIGIN = "https://app.example"
MAX_FRAME = 4096
LEASE_S = 3


def _jwk(public_key: Any, kid: str, alg: str) -> dict[str, Any]:
    algo = jwt.algorithms.RSAAlgorithm if alg == "RS256" else jwt.algorithms.ECAlgorithm
    return {**algo.to_jwk(public_key, as_dict=True), "kid": kid, "alg": alg, "use": "sig"}


def _subject(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def edge(infra, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Two gateways with small, separately tuned limits and a JWKS file; no orchestrator."""
    folder = tmp_path_factory.mktemp("edge")
    jwks = folder / "jwks.json"
    jwks.write_text(
        json.dumps(
            {
                "keys": [
                    _jwk(RSA_KEY.public_key(), "rsa-1", "RS256"),
                    _jwk(EC_KEY.public_key(), "ec-1", "ES256"),
                ]
            }
        )
    )
    env = stack_env(
        infra,
        TIDEWIRE_JWKS_FILE=str(jwks),
        TIDEWIRE_ALLOWED_ORIGINS=ALLOWED_ORIGIN,
        TIDEWIRE_MAX_FRAME_BYTES=str(MAX_FRAME),
        TIDEWIRE_MSG_RATE_PER_S="2",
        TIDEWIRE_MSG_BURST="3",
        TIDEWIRE_FRAME_RATE_PER_S="20",
        TIDEWIRE_FRAME_BURST="30",
        TIDEWIRE_SUBJECT_MSG_RATE_PER_S="1",
        TIDEWIRE_SUBJECT_MSG_BURST="5",
        TIDEWIRE_MAX_CONNECTIONS_PER_SUBJECT="3",
        TIDEWIRE_CONNECTION_LEASE_S=str(LEASE_S),
        TIDEWIRE_MAX_SESSIONS_PER_SUBJECT="3",
        TIDEWIRE_TURN_QUEUE_SHED_THRESHOLD="-1",
    )
    s = Stack(infra_env=env, log_dir=folder / "logs", orchestrators=0, tool_workers=0)
    s.start()
    s.add_gateway("gateway-2")
    try:
        yield s
    finally:
        s.stop()


def _url(stack: Stack, name: str = "gateway") -> str:
    return f"http://127.0.0.1:{stack.by_name(name).env['port']}"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


def _auth(token: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


async def _new_session(http: aiohttp.ClientSession, base: str, token: str) -> str:
    async with http.post(f"{base}/v1/sessions", headers=_auth(token)) as r:
        assert r.status == 201, await r.text()
        return str((await r.json())["session_id"])


async def _ws_outcome(
    http: aiohttp.ClientSession,
    base: str,
    token: str,
    hello: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> client.ServerFrame | int:
    """The first answer of a WebSocket: a frame, or the close code if the server closed it."""
    url = base.replace("http", "ws", 1) + f"/v1/ws?access_token={token}"
    async with http.ws_connect(url, headers=headers or {}) as ws:
        try:
            await ws.send_str(json.dumps({"type": "hello", **(hello or {})}))
        except (ConnectionError, RuntimeError):
            pass  # already closed by the server: the close code tells why
        msg = await within(
            ws.receive(), timeout=10, what=f"the first answer (frame or close) to hello {hello or {}}"
        )
        if msg.type == aiohttp.WSMsgType.TEXT:
            return client.server_frame_decoder.decode(msg.data)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING), msg
        assert ws.close_code is not None
        return ws.close_code


async def _error(c: WsTestClient, timeout: float = 10) -> client.Error:
    f = await c.until(lambda f: isinstance(f, client.Error), timeout, "an error frame")
    assert isinstance(f, client.Error)
    return f


async def _pong_follows(c: WsTestClient) -> None:
    """The connection is still usable: a ping is answered."""
    await c.send({"type": "ping"})
    await c.until(
        lambda f: isinstance(f, client.Pong), 10, "the pong to a ping (is the connection still usable?)"
    )


# ---- authentication ----------------------------------------------------------------------------


async def test_rs256_and_es256_tokens_from_the_jwks_file_are_accepted(edge, http) -> None:
    rs = tokens.mint(_subject("rs"), RSA_KEY, algorithm="RS256", kid="rsa-1")
    es = tokens.mint(_subject("es"), EC_KEY, algorithm="ES256", kid="ec-1")
    sid = await _new_session(http, edge.url, rs)
    assert isinstance(await _ws_outcome(http, edge.url, es), client.Ready)
    async with http.get(f"{edge.url}/v1/sessions/{sid}", headers=_auth(rs)) as r:
        assert r.status == 200


def _forged(alg: str, key: bytes | None, kid: str | None = None) -> str:
    import base64
    import hashlib
    import hmac

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    now = int(time.time())
    header = {"alg": alg, "typ": "JWT", **({"kid": kid} if kid else {})}
    body = {"sub": "mallory", "iss": "tidewire", "aud": "tidewire", "iat": now, "exp": now + 600}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}"
    sig = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


RSA_PEM = RSA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
ATTACKS = {
    "alg_none": _forged("none", None),
    "alg_none_with_kid": _forged("none", None, "rsa-1"),
    "rsa_public_key_as_hmac_secret": _forged("HS256", RSA_PEM, "rsa-1"),
    "rsa_public_key_as_hmac_secret_no_kid": _forged("HS256", RSA_PEM),
    "expired": make_token("alice", ttl_s=-120),
    "wrong_secret": tokens.mint("alice", "another-secret-0123456789abcdef0123456789"),
    "wrong_audience": tokens.mint("alice", SECRET, audience="someone-else"),
    "garbage": "not.a.token",
}


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_bad_tokens_are_refused_on_http_and_websocket(edge, http, attack: str) -> None:
    token = ATTACKS[attack]
    async with http.post(f"{edge.url}/v1/sessions", headers=_auth(token)) as r:
        assert r.status == 401
        assert (await r.json())["code"] == "unauthorized"
    assert await _ws_outcome(http, edge.url, token) == 4401


@pytest.mark.parametrize(
    "method,path",
    [
        ("POST", "/v1/sessions"),
        ("GET", "/v1/sessions"),
        ("GET", "/v1/sessions/abc"),
        ("POST", "/v1/sessions/abc/messages"),
        ("POST", "/v1/sessions/abc/stop"),
        ("PATCH", "/v1/sessions/abc/flags"),
        ("GET", "/v1/sessions/abc/events"),
        ("GET", "/v1/sessions/abc/poll"),
    ],
)
async def test_every_api_route_needs_a_token(edge, http, method: str, path: str) -> None:
    async with http.request(method, edge.url + path, json={}) as r:
        assert r.status == 401, (method, path, r.status)


async def test_openapi_and_health_need_no_token(edge, http) -> None:
    async with http.get(f"{edge.url}/openapi.json") as r:
        doc = await r.json()
        assert r.status == 200 and doc["openapi"].startswith("3.1")
    assert "/v1/sessions/{sid}/messages" in doc["paths"]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    async with http.get(f"{edge.url}/healthz") as r:
        assert r.status == 200


async def test_token_expiring_on_an_open_socket_closes_it_with_4401(edge) -> None:
    async with WsTestClient(edge.url, make_token(_subject("short"), ttl_s=3)) as c:
        await c.connect()
        t0 = time.monotonic()
        deadline = t0 + 15
        while (
            await c.recv(
                timeout=max(deadline - time.monotonic(), 0.01),
                what="the close (4401) when the 3 s token expires",
            )
            is not None
        ):
            pass
        assert c.close_code == 4401
        assert time.monotonic() - t0 < 6


# ---- authorization: another subject's session, on every path ----------------------------------


async def test_another_subjects_session_is_refused_on_every_path(edge, http) -> None:
    owner, intruder = make_token(_subject("owner")), make_token(_subject("intruder"))
    sid = await _new_session(http, edge.url, owner)
    base = f"{edge.url}/v1/sessions/{sid}"
    for gw in ("gateway", "gateway-2"):
        assert await _ws_outcome(http, _url(edge, gw), intruder, {"session_id": sid}) == 4403
    checks = [
        ("GET", base, None),
        ("GET", f"{base}/events", None),
        ("GET", f"{base}/poll?wait_s=0", None),
        ("POST", f"{base}/messages", {"client_msg_id": "x1", "text": "hi"}),
        ("POST", f"{base}/stop", {}),
        ("PATCH", f"{base}/flags", {"double_text_policy": "reject"}),
    ]
    for method, url, body in checks:
        async with http.request(method, url, json=body, headers=_auth(intruder)) as r:
            assert r.status == 403, (method, url, r.status)
            assert (await r.json())["code"] == "forbidden"
    # and the owner is served on every one of them
    assert isinstance(await _ws_outcome(http, edge.url, owner, {"session_id": sid}), client.Ready)
    async with http.get(f"{base}/poll?wait_s=0", headers=_auth(owner)) as r:
        assert r.status == 200


async def test_unknown_or_malformed_session_ids_are_not_found(edge, http) -> None:
    token = make_token(_subject("nf"))
    for sid in ("doesnotexist", "a" * 129, "bad%00id", "..%2f..%2fetc"):
        async with http.get(f"{edge.url}/v1/sessions/{sid}/poll?wait_s=0", headers=_auth(token)) as r:
            assert r.status == 404, (sid, r.status)
    assert await _ws_outcome(http, edge.url, token, {"session_id": "a\u0000b"}) == 4403


# ---- origin allowlist --------------------------------------------------------------------------


async def test_bad_origin_is_refused_on_websocket_and_sse(edge, http) -> None:
    token = make_token(_subject("origin"))
    sid = await _new_session(http, edge.url, token)
    evil = {"Origin": "https://evil.example"}
    assert await _ws_outcome(http, edge.url, token, headers=evil) == 4403
    async with http.get(f"{edge.url}/v1/sessions/{sid}/events", headers=_auth(token, **evil)) as r:
        assert r.status == 403 and (await r.json())["code"] == "forbidden"
    async with http.get(f"{edge.url}/v1/sessions/{sid}/poll?wait_s=0", headers=_auth(token, **evil)) as r:
        assert r.status == 403
    async with http.post(
        f"{edge.url}/v1/sessions/{sid}/messages",
        headers=_auth(token, **evil),
        json={"client_msg_id": "o1", "text": "csrf?"},
    ) as r:
        assert r.status == 403
    ready = await _ws_outcome(http, edge.url, token, headers={"Origin": ALLOWED_ORIGIN})
    assert isinstance(ready, client.Ready)
    async with http.get(
        f"{edge.url}/v1/sessions/{sid}/events", headers=_auth(token, Origin=ALLOWED_ORIGIN)
    ) as r:
        assert r.status == 200
        assert (await r.content.readuntil(b"\n\n")).startswith(b"event: ready")


# ---- limits, each triggering and recovering ----------------------------------------------------


async def test_per_connection_message_rate_limits_then_recovers(edge) -> None:
    async with WsTestClient(edge.url, make_token(_subject("connrate"))) as c:
        await c.connect()
        for i in range(3):
            await c.ack_for(await c.send_message(f"burst {i}"))
        cmid = await c.send_message("one too many")
        err = await _error(c)
        assert err.code == "rate_limited" and "connection" in err.message and err.retry_after_ms
        await asyncio.sleep(err.retry_after_ms / 1000 + 0.05)
        ack = await c.ack_for(await c.send_message("one too many", cmid))
        assert not ack.duplicate  # the refused send was not accepted


async def test_per_subject_message_rate_spans_gateways_then_recovers(edge) -> None:
    token = make_token(_subject("subjrate"))
    async with (
        WsTestClient(_url(edge, "gateway"), token) as a,
        WsTestClient(_url(edge, "gateway-2"), token) as b,
    ):
        await a.connect()
        await b.connect()
        for i in range(3):
            await a.ack_for(await a.send_message(f"a{i}"))
        for i in range(2):
            await b.ack_for(await b.send_message(f"b{i}"))
        await b.send_message("b-over")
        err = await _error(b)
        assert err.code == "rate_limited" and "user" in err.message and err.retry_after_ms
        await asyncio.sleep(err.retry_after_ms / 1000 + 0.05)
        await b.ack_for(await b.send_message("b-after"))


async def test_http_sends_share_the_subjects_rate(edge, http) -> None:
    token = make_token(_subject("httprate"))
    sid = await _new_session(http, edge.url, token)
    statuses = []
    for i in range(7):
        async with http.post(
            f"{edge.url}/v1/sessions/{sid}/messages",
            headers=_auth(token),
            json={"client_msg_id": f"h{i}", "text": "hello"},
        ) as r:
            statuses.append(r.status)
            if r.status == 429:
                body = await r.json()
                assert body["code"] == "rate_limited" and body["retry_after_ms"] > 0
                assert int(r.headers["Retry-After"]) >= 1
                retry_ms = body["retry_after_ms"]
    assert statuses[:5] == [200] * 5 and 429 in statuses[5:]
    await asyncio.sleep(retry_ms / 1000 + 0.05)
    async with http.post(
        f"{edge.url}/v1/sessions/{sid}/messages",
        headers=_auth(token),
        json={"client_msg_id": "h-after", "text": "hello"},
    ) as r:
        assert r.status == 200


async def test_frame_flood_is_answered_rate_limited_and_recovers(edge) -> None:
    async with WsTestClient(edge.url, make_token(_subject("flood"))) as c:
        await c.connect()
        assert c.ws is not None
        n = 60
        for _ in range(n):
            await c.ws.send_str('{"type":"ping"}')
        answers = [
            await c.recv(timeout=10, what=f"the answer (pong or rate_limited) to ping {i + 1} of {n}")
            for i in range(n)
        ]
        pongs = sum(isinstance(f, client.Pong) for f in answers)
        limited = [f for f in answers if isinstance(f, client.Error) and f.code == "rate_limited"]
        assert pongs + len(limited) == n and pongs >= 25 and limited
        await asyncio.sleep(max(f.retry_after_ms or 0 for f in limited) / 1000 + 0.1)
        await _pong_follows(c)


async def test_oversized_frames_get_too_large_and_giant_ones_a_1009_close(edge) -> None:
    async with WsTestClient(edge.url, make_token(_subject("big"))) as c:
        await c.connect()
        assert c.ws is not None
        await c.send_message("x" * (MAX_FRAME + 10))
        assert (await _error(c)).code == "too_large"
        await _pong_follows(c)
        await c.ws.send_str(json.dumps({"type": "send", "client_msg_id": "e", "text": "€" * 1400}))  # 4.2 kB
        assert (await _error(c)).code == "too_large"
        await _pong_follows(c)
        await c.ws.send_str("y" * (MAX_FRAME * 4 + 1))  # over aiohttp's max_msg_size: the connection fails
        deadline = time.monotonic() + 10
        while (
            await c.recv(
                timeout=max(deadline - time.monotonic(), 0.01),
                what="the 1009 close after a frame over 4 * max_frame_bytes",
            )
            is not None
        ):
            pass
        assert c.close_code == 1009


async def test_oversized_http_body_is_413(edge, http) -> None:
    token = make_token(_subject("bigbody"))
    sid = await _new_session(http, edge.url, token)
    async with http.post(
        f"{edge.url}/v1/sessions/{sid}/messages",
        headers=_auth(token),
        data=json.dumps({"client_msg_id": "b", "text": "z" * MAX_FRAME}),
    ) as r:
        assert r.status == 413 and (await r.json())["code"] == "too_large"


async def test_max_sessions_per_subject_is_too_large_and_the_socket_stays_usable(edge, http) -> None:
    token = make_token(_subject("many"))
    for _ in range(3):
        await _new_session(http, edge.url, token)
    async with http.post(f"{edge.url}/v1/sessions", headers=_auth(token)) as r:
        assert r.status == 413 and (await r.json())["code"] == "too_large"
    async with WsTestClient(edge.url, token) as c:
        c.ws = await c.session.ws_connect(edge.url.replace("http", "ws", 1) + f"/v1/ws?access_token={token}")
        await c.send({"type": "hello"})
        assert (await _error(c)).code == "too_large"
        await _pong_follows(c)


async def test_connections_per_subject_span_gateways_refuse_with_4429_and_recover(edge, http) -> None:
    token = make_token(_subject("conns"))
    sid = await _new_session(http, edge.url, token)
    g1, g2 = _url(edge, "gateway"), _url(edge, "gateway-2")
    async with WsTestClient(g1, token) as a, WsTestClient(g2, token) as b:
        await a.connect(sid)
        await b.connect(sid)
        async with http.get(f"{g1}/v1/sessions/{sid}/events", headers=_auth(token)) as sse:
            assert sse.status == 200
            await within(sse.content.readuntil(b"\n\n"), timeout=10, what="the first SSE record (ready)")
            assert await _ws_outcome(http, g2, token) == 4429
            assert await _ws_outcome(http, g1, token) == 4429
            async with http.get(f"{g2}/v1/sessions/{sid}/events", headers=_auth(token)) as r:
                assert r.status == 429 and (await r.json())["code"] == "rate_limited"
            async with http.get(f"{g1}/v1/sessions/{sid}/poll?wait_s=0", headers=_auth(token)) as r:
                assert r.status == 429
        await b.drop()
        await eventually(
            lambda: _ws_outcome(http, g2, token, {"session_id": sid}),
            timeout=5,
            interval=0.1,
            ok=lambda o: isinstance(o, client.Ready),
            what="a new connection accepted (ready) after one of the subject's connections closed",
        )


async def test_limit_scripts_are_atomic_and_clocked_by_redis(infra) -> None:
    """The Lua side directly: a burst spent by many appends at once is never overspent, what is
    refused is not appended, and a retried send is answered as a duplicate, never charged."""
    import redis.asyncio as aioredis

    from gateway.limits import EdgeCounters, SubjectLimits
    from gateway.settings import GatewaySettings
    from shared.checkpoints import CheckpointStore, MessageQuota
    from shared.errors import RateLimited

    r = aioredis.Redis.from_url(infra.endpoints.redis_url)
    try:
        limits = SubjectLimits(
            r,
            GatewaySettings(
                subject_msg_rate_per_s=0.5,
                subject_msg_burst=10,
                max_connections_per_subject=4,
                limits_timeout_s=5,
            ),
            "unit-gw",
            EdgeCounters(),
        )
        subject = _subject("lua")
        quota = limits.message_quota(subject)
        assert quota == MessageQuota(subject, 0.5, 10)
        store = CheckpointStore(r)
        sids = [f"s-quota-{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]  # one subject, 3 sessions
        for sid in sids:
            await store.seed(sid, 0)

        async def send(i: int, cmid: str | None = None) -> Any:
            sid = sids[i % len(sids)]
            return await store.append_user(
                sid, cmid or f"c{i}", f"t{i}", b'{"type":"message","seq":0,}', b"req", "queue", quota
            )

        results = await asyncio.gather(*(send(i) for i in range(30)), return_exceptions=True)
        taken = [i for i, x in enumerate(results) if not isinstance(x, BaseException)]
        refused = [x for x in results if isinstance(x, RateLimited)]
        assert len(taken) == 10 and len(refused) == 20, results
        assert all(e.retry_after_ms and e.retry_after_ms > 0 for e in refused)
        appended = sum([len(await store.read_log(sid, 0, 100)) for sid in sids])
        assert appended == 10, f"{appended} messages appended for 10 admitted"
        again = await send(taken[0])  # the bucket is empty; a retry of an admitted send is answered
        assert again.duplicate and again.seq == results[taken[0]].seq
        slots = await asyncio.gather(*(limits.acquire(subject) for _ in range(12)), return_exceptions=True)
        taken = [s for s in slots if not isinstance(s, BaseException)]
        assert len(taken) == 4
        await limits.release(taken[0])
        await limits.acquire(subject)
    finally:
        await r.aclose()


async def test_slots_of_a_dead_gateway_lapse_after_the_lease(edge, http) -> None:
    token = make_token(_subject("lapse"))
    sid = await _new_session(http, edge.url, token)
    g1, g2 = _url(edge, "gateway"), _url(edge, "gateway-2")
    clients = [WsTestClient(g2, token) for _ in range(3)]
    for c in clients:
        await c.__aenter__()
        await c.connect(sid)
    try:
        assert await _ws_outcome(http, g1, token) == 4429
        edge.by_name("gateway-2").kill()
        t0 = time.monotonic()
        await eventually(
            lambda: _ws_outcome(http, g1, token, {"session_id": sid}),
            timeout=LEASE_S * 3,
            interval=0.2,
            ok=lambda o: o != 4429,
            what=f"the killed gateway's connection slots to lapse (lease {LEASE_S} s) and 4429 to stop",
        )
        assert time.monotonic() - t0 >= LEASE_S * 0.5
    finally:
        for c in clients:
            c.ws = None
            await c.__aexit__(None, None, None)
        edge.add_gateway("gateway-2")


# ---- load shedding -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shedding(infra, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("shed")
    s = Stack(
        infra_env=stack_env(infra, TIDEWIRE_TURN_QUEUE_SHED_THRESHOLD="0"),
        log_dir=folder,
        orchestrators=0,
        tool_workers=0,
    )
    s.start()
    try:
        yield s
    finally:
        s.stop()


async def test_shedding_answers_degraded_within_50_ms(shedding, http) -> None:
    token = make_token(_subject("shed"))
    latencies = []
    async with WsTestClient(shedding.url, token) as c:
        ready = await c.connect()
        assert c.ws is not None
        for i in range(10):
            t0 = time.perf_counter()
            await c.ws.send_str(json.dumps({"type": "send", "client_msg_id": f"s{i}", "text": "hello"}))
            err = await _error(c)
            latencies.append(time.perf_counter() - t0)
            assert err.code == "degraded" and err.retry_after_ms and err.retry_after_ms > 0
    t0 = time.perf_counter()
    async with http.post(
        f"{shedding.url}/v1/sessions/{ready.session_id}/messages",
        headers=_auth(token),
        json={"client_msg_id": "h", "text": "hello"},
    ) as r:
        http_latency = time.perf_counter() - t0
        assert r.status == 503 and (await r.json())["code"] == "degraded" and "Retry-After" in r.headers
    latencies.sort()
    print(
        f"degraded latency: ws median {latencies[5] * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms, "
        f"http {http_latency * 1000:.1f} ms"
    )
    assert latencies[-1] < 0.05
    assert http_latency < 0.05


async def test_shedding_on_queue_depth_recovers_when_orchestrators_catch_up(infra, tmp_path_factory) -> None:
    folder = tmp_path_factory.mktemp("shed-recover")
    s = Stack(
        infra_env=stack_env(infra, TIDEWIRE_TURN_QUEUE_SHED_THRESHOLD="3", TIDEWIRE_SHED_SAMPLE_MS="100"),
        log_dir=folder,
        orchestrators=0,
        tool_workers=0,
    )
    s.start()
    try:
        async with WsTestClient(s.url, make_token(_subject("deep"))) as c:
            await c.connect()
            shed = None
            for i in range(12):
                cmid = await c.send_message(f"/sim tokens=3\nqueue {i}")
                f = await c.until(
                    lambda f: isinstance(f, client.Ack | client.Error), 10, f"the ack or error of send {i}"
                )
                if isinstance(f, client.Error):
                    shed = f
                    break
                await asyncio.sleep(0.25)
            assert shed is not None and shed.code == "degraded" and "turn queue" in shed.message
            s.add_orchestrator("orchestrator-shed")

            async def resend() -> client.ServerFrame:
                await c.send_message("/sim tokens=3\nafter", cmid)
                return await c.until(
                    lambda f: isinstance(f, client.Ack | client.Error),
                    10,
                    f"the ack or error of a resend of {cmid}",
                )

            await eventually(
                resend,
                timeout=60,
                interval=0.3,
                ok=lambda f: isinstance(f, client.Ack),
                what="the shed send to be accepted once an orchestrator drains the turn queue",
            )
    finally:
        s.stop()


# ---- TLS ---------------------------------------------------------------------------------------


def _self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


async def test_gateway_serves_https_and_wss_itself(infra, spawn, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    port = free_port()
    gw = spawn(
        "gateway",
        {
            **stack_env(infra),
            "TIDEWIRE_HTTP_PORT": str(port),
            "TIDEWIRE_GATEWAY_ID": "gw-tls",
            "TIDEWIRE_TLS_CERT": str(cert),
            "TIDEWIRE_TLS_KEY": str(key),
        },
        name="gateway-tls",
    )
    ctx = ssl.create_default_context(cafile=str(cert))
    base = f"https://127.0.0.1:{port}"
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx), timeout=aiohttp.ClientTimeout(total=30)
    ) as https:

        async def readyz() -> int:
            assert gw.alive, gw.log_text()[-2000:]
            async with https.get(f"{base}/readyz") as r:
                return r.status

        await eventually(
            readyz,
            timeout=60,
            interval=0.2,
            ok=lambda status: status == 200,
            retry_on=(aiohttp.ClientError,),
            what=f"the TLS gateway's {base}/readyz to answer 200",
        )
        token = make_token(_subject("tls"))
        sid = await _new_session(https, base, token)
        async with https.ws_connect(f"wss://127.0.0.1:{port}/v1/ws?access_token={token}") as ws:
            await ws.send_json({"type": "hello", "session_id": sid})
            msg = await within(ws.receive(), timeout=10, what="ready over wss")
            ready = client.server_frame_decoder.decode(msg.data)
            assert isinstance(ready, client.Ready) and ready.session_id == sid
    async with aiohttp.ClientSession() as plain:
        with pytest.raises(aiohttp.ClientError):
            async with plain.get(f"http://127.0.0.1:{port}/healthz") as r:
                await r.read()
    with pytest.raises(aiohttp.ClientConnectorError):
        async with aiohttp.ClientSession() as untrusting, untrusting.get(f"{base}/healthz"):
            pass
