"""JWT bearer tokens: verification for the gateway and minting for dev mode (`tidewire token`).

What is trusted, and for what: a `KeyRing` holds the shared HS256 secret (dev mode, tests) and the
public keys of a JWKS file (`TIDEWIRE_JWKS_FILE`, RS256 / ES256, for tokens an identity provider
issues). Every key verifies exactly one algorithm, so the two classic attacks fail by construction:

- `alg: none` (or any algorithm outside `ALLOWED_ALGORITHMS`) is refused before any key is chosen;
- algorithm confusion (an RS256 public key used as an HS256 secret) is refused because the token's
  `alg` must equal the chosen key's own algorithm, and PyJWT is only ever handed that one algorithm.

`exp`, `nbf`, `iss` and `aud` are checked by PyJWT with a small clock skew (`LEEWAY_S`), never by
hand-written crypto. A JWKS file is re-read when it changes (key rotation without a restart).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import jwt

from shared.errors import Unauthorized

log = logging.getLogger(__name__)

ALLOWED_ALGORITHMS = frozenset({"HS256", "RS256", "ES256"})
ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "ES256"})
ALGORITHMS = ["HS256"]  # what `verify` with a bare secret accepts (kept for callers of the old API)
LEEWAY_S = 30
REQUIRED_CLAIMS = ["exp", "sub", "iss", "aud"]
JWKS_RECHECK_S = 5.0


@dataclass(frozen=True)
class TrustedKey:
    """A verification key and the one algorithm it may verify."""

    kid: str | None
    algorithm: str
    material: Any


@dataclass(frozen=True)
class Claims:
    subject: str
    expires_at: float
    issuer: str
    key_id: str | None
    algorithm: str


def load_jwks(data: dict[str, Any]) -> list[TrustedKey]:
    """The usable public signing keys of a JWKS document; anything else is skipped with a warning
    (symmetric `oct` keys, encryption keys, algorithms outside the allowlist)."""
    keys: list[TrustedKey] = []
    for raw in data.get("keys", []):
        kid = raw.get("kid")
        if raw.get("use", "sig") != "sig":
            log.warning("jwks key %s skipped: use=%s", kid, raw.get("use"))
            continue
        if raw.get("kty") == "oct":
            log.warning("jwks key %s skipped: symmetric keys do not belong in a JWKS", kid)
            continue
        try:
            jwk = jwt.PyJWK(raw)
        except jwt.PyJWTError as e:
            log.warning("jwks key %s skipped: %s", kid, e)
            continue
        if jwk.algorithm_name not in ASYMMETRIC_ALGORITHMS:
            log.warning("jwks key %s skipped: algorithm %s is not allowed", kid, jwk.algorithm_name)
            continue
        keys.append(TrustedKey(kid=jwk.key_id, algorithm=jwk.algorithm_name, material=jwk.key))
    return keys


class KeyRing:
    """The keys the gateway trusts. Pure lookup: `key_for(header)` never guesses between keys."""

    def __init__(self, secret: str | None = None, jwks: list[TrustedKey] | None = None) -> None:
        self.secret = TrustedKey(kid=None, algorithm="HS256", material=secret.encode()) if secret else None
        self.jwks = list(jwks or [])
        self.by_kid = {k.kid: k for k in self.jwks if k.kid}

    def key_for(self, header: dict[str, Any]) -> TrustedKey:
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
            raise Unauthorized(f"token algorithm {alg!r} is not allowed")
        kid = header.get("kid")
        if kid is not None:
            key = self.by_kid.get(kid) if isinstance(kid, str) else None
            if key is None:
                raise Unauthorized("token signed by an unknown key")
        elif alg == "HS256":
            if self.secret is None:
                raise Unauthorized("HS256 tokens are not accepted here")
            key = self.secret
        else:
            candidates = [k for k in self.jwks if k.algorithm == alg]
            if len(candidates) != 1:
                raise Unauthorized("token names no key (kid) and several keys could verify it")
            key = candidates[0]
        if key.algorithm != alg:
            raise Unauthorized(f"key {key.kid} verifies {key.algorithm} only, not {alg}")
        return key


class Verifier:
    """Verifies bearer tokens against a key ring (re-reading the JWKS file when it changes)."""

    def __init__(
        self,
        secret: str | None,
        *,
        issuer: str,
        audience: str,
        jwks_file: str = "",
        leeway_s: float = LEEWAY_S,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.leeway_s = leeway_s
        self._secret = secret
        self._jwks_file = jwks_file
        self._jwks_mtime: float | None = None
        self._checked_at = 0.0
        self._lock = threading.Lock()
        self.ring = KeyRing(secret)
        if jwks_file:
            self._reload(force=True)

    def _reload(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked_at < JWKS_RECHECK_S:
            return
        with self._lock:
            self._checked_at = now
            try:
                mtime = os.stat(self._jwks_file).st_mtime
            except OSError as e:
                if force:
                    raise ValueError(f"JWKS file {self._jwks_file} is not readable: {e}") from e
                log.warning("JWKS file unreadable, keeping the keys loaded before: %s", e)
                return
            if mtime == self._jwks_mtime:
                return
            with open(self._jwks_file, encoding="utf-8") as f:
                keys = load_jwks(json.load(f))
            self.ring = KeyRing(self._secret, keys)
            self._jwks_mtime = mtime
            log.info("loaded %d signing keys from the JWKS file", len(keys))

    def verify(self, token: str) -> Claims:
        if self._jwks_file:
            self._reload()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            raise Unauthorized(f"invalid token: {e}") from e
        key = self.ring.key_for(header)
        try:
            claims = jwt.decode(
                token,
                key.material,
                algorithms=[key.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.ExpiredSignatureError as e:
            raise Unauthorized("token expired") from e
        except jwt.ImmatureSignatureError as e:
            raise Unauthorized("token not valid yet") from e
        except jwt.PyJWTError as e:
            raise Unauthorized(f"invalid token: {e}") from e
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > 256:
            raise Unauthorized("token subject must be a non-empty string")
        return Claims(
            subject=sub,
            expires_at=float(claims["exp"]),
            issuer=str(claims["iss"]),
            key_id=key.kid,
            algorithm=key.algorithm,
        )


def mint(
    subject: str,
    secret: Any,
    *,
    issuer: str = "tidewire",
    audience: str = "tidewire",
    ttl_s: float = 7 * 86400,
    algorithm: str = "HS256",
    kid: str | None = None,
    not_before_s: float | None = None,
) -> str:
    """A token for `subject`. `secret` is the HS256 secret, or a private key for RS256 / ES256."""
    now = int(time.time())
    nbf = now - 1 if not_before_s is None else int(not_before_s)
    headers = {"kid": kid} if kid else None
    return jwt.encode(
        {"sub": subject, "iss": issuer, "aud": audience, "iat": now, "nbf": nbf, "exp": now + int(ttl_s)},
        secret,
        algorithm=algorithm,
        headers=headers,
    )


def verify(
    token: str, secret: str, *, issuer: str = "tidewire", audience: str = "tidewire"
) -> tuple[str, float]:
    """HS256 only, with the shared secret. Returns (subject, expiry as unix time)."""
    claims = Verifier(secret, issuer=issuer, audience=audience).verify(token)
    return claims.subject, claims.expires_at
