"""JWT bearer tokens: verification for the gateway and minting for dev mode (`tidewire token`).

Algorithms are an explicit allowlist (HS256 with the shared secret); `exp`, `nbf`, `iss` and `aud`
are checked with a small clock skew by PyJWT, never by hand-written crypto.
"""

from __future__ import annotations

import time

import jwt

from shared.errors import Unauthorized

ALGORITHMS = ["HS256"]
LEEWAY_S = 30


def mint(subject: str, secret: str, *, issuer: str = "tidewire", audience: str = "tidewire",
         ttl_s: float = 7 * 86400) -> str:
    now = int(time.time())
    return jwt.encode({"sub": subject, "iss": issuer, "aud": audience, "iat": now, "nbf": now - 1,
                       "exp": now + int(ttl_s)}, secret, algorithm="HS256")


def verify(token: str, secret: str, *, issuer: str = "tidewire", audience: str = "tidewire") -> tuple[str, float]:
    """Returns (subject, expiry as unix time)."""
    try:
        claims = jwt.decode(token, secret, algorithms=ALGORITHMS, audience=audience, issuer=issuer,
                            leeway=LEEWAY_S, options={"require": ["exp", "sub", "iss", "aud"]})
    except jwt.ExpiredSignatureError as e:
        raise Unauthorized("token expired") from e
    except jwt.PyJWTError as e:
        raise Unauthorized(f"invalid token: {e}") from e
    return str(claims["sub"]), float(claims["exp"])
