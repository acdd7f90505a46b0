"""Bearer tokens: the algorithm allowlist, per-key algorithms, the classic JWT attacks, the time and
audience claims with their skew, JWKS loading and rotation, and the Origin guard."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from pathlib import Path

import jwt
import pytest
from aiohttp.test_utils import make_mocked_request
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway import auth
from gateway.settings import DEV_JWT_SECRET, GatewaySettings
from shared import tokens
from shared.errors import Forbidden, Unauthorized

SECRET = "unit-test-secret-0123456789abcdef0123"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**over: object) -> dict[str, object]:
    now = int(time.time())
    return {
        "sub": "alice",
        "iss": "tidewire",
        "aud": "tidewire",
        "iat": now,
        "nbf": now - 1,
        "exp": now + 600,
        **over,
    }


def _forge(header: dict[str, object], claims: dict[str, object], key: bytes | None) -> str:
    """A token built by hand, the way an attacker would (PyJWT refuses to make these)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    sig = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(sig)}"


def _jwk(public_key: object, kid: str, alg: str | None) -> dict[str, object]:
    algo = (
        jwt.algorithms.RSAAlgorithm
        if isinstance(public_key, rsa.RSAPublicKey)
        else jwt.algorithms.ECAlgorithm
    )
    data = algo.to_jwk(public_key, as_dict=True)
    data.update({"kid": kid, "use": "sig"})
    if alg:
        data["alg"] = alg
    return data


def _jwks(*keys: dict[str, object]) -> dict[str, object]:
    return {"keys": list(keys)}


RSA_JWK = _jwk(RSA_KEY.public_key(), "rsa-1", "RS256")
EC_JWK = _jwk(EC_KEY.public_key(), "ec-1", "ES256")
RSA_PUBLIC_PEM = RSA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def _verifier(
    tmp_path: Path,
    *,
    secret: str | None = SECRET,
    keys: list[dict[str, object]] | None = None,
    leeway_s: float = 30,
) -> tokens.Verifier:
    path = ""
    if keys is not None:
        f = tmp_path / "jwks.json"
        f.write_text(json.dumps(_jwks(*keys)))
        path = str(f)
    return tokens.Verifier(secret, issuer="tidewire", audience="tidewire", jwks_file=path, leeway_s=leeway_s)


def test_hs256_token_round_trips() -> None:
    token = tokens.mint("alice", SECRET, ttl_s=60)
    assert tokens.verify(token, SECRET)[0] == "alice"


def test_rs256_and_es256_tokens_from_jwks_are_accepted(tmp_path: Path) -> None:
    v = _verifier(tmp_path, keys=[RSA_JWK, EC_JWK])
    rs = tokens.mint("bob", RSA_KEY, algorithm="RS256", kid="rsa-1")
    es = tokens.mint("carol", EC_KEY, algorithm="ES256", kid="ec-1")
    assert (v.verify(rs).subject, v.verify(rs).algorithm) == ("bob", "RS256")
    assert (v.verify(es).subject, v.verify(es).algorithm) == ("carol", "ES256")


def test_a_single_key_of_the_algorithm_may_be_used_without_kid(tmp_path: Path) -> None:
    v = _verifier(tmp_path, keys=[RSA_JWK])
    assert v.verify(tokens.mint("bob", RSA_KEY, algorithm="RS256")).subject == "bob"


def test_algorithm_inferred_from_the_key_when_jwk_has_no_alg(tmp_path: Path) -> None:
    v = _verifier(tmp_path, keys=[_jwk(EC_KEY.public_key(), "ec-2", None)])
    assert v.verify(tokens.mint("dave", EC_KEY, algorithm="ES256", kid="ec-2")).subject == "dave"


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE", "", None])
def test_alg_none_is_refused(tmp_path: Path, alg: str | None) -> None:
    v = _verifier(tmp_path, keys=[RSA_JWK])
    forged = _forge({"alg": alg, "typ": "JWT"}, _claims(), None)
    with pytest.raises(Unauthorized, match="not allowed"):
        v.verify(forged)
    with pytest.raises(Unauthorized):
        v.verify(forged.rsplit(".", 1)[0] + ".")


@pytest.mark.parametrize("alg", ["HS384", "HS512", "RS512", "PS256", "ES384", "EdDSA"])
def test_algorithms_outside_the_allowlist_are_refused(tmp_path: Path, alg: str) -> None:
    v = _verifier(tmp_path, keys=[RSA_JWK])
    with pytest.raises(Unauthorized, match="not allowed"):
        v.verify(_forge({"alg": alg}, _claims(), SECRET.encode()))


@pytest.mark.parametrize("kid", ["rsa-1", None])
def test_rsa_public_key_used_as_hmac_secret_is_refused(tmp_path: Path, kid: str | None) -> None:
    """Algorithm confusion: the attacker signs HS256 with the (public) RSA key's PEM bytes."""
    v = _verifier(tmp_path, keys=[RSA_JWK])
    header: dict[str, object] = {"alg": "HS256", "typ": "JWT"}
    if kid:
        header["kid"] = kid
    for key in (RSA_PUBLIC_PEM, RSA_PUBLIC_PEM.strip(), json.dumps(RSA_JWK).encode()):
        with pytest.raises(Unauthorized):
            v.verify(_forge(header, _claims(), key))


def test_hmac_attack_without_any_hs_secret_configured(tmp_path: Path) -> None:
    v = _verifier(tmp_path, secret=None, keys=[RSA_JWK])
    with pytest.raises(Unauthorized, match="HS256 tokens are not accepted"):
        v.verify(_forge({"alg": "HS256"}, _claims(), RSA_PUBLIC_PEM))


def test_token_alg_must_match_the_keys_own_algorithm(tmp_path: Path) -> None:
    v = _verifier(tmp_path, keys=[RSA_JWK, EC_JWK])
    es_token_naming_rsa_key = tokens.mint("eve", EC_KEY, algorithm="ES256", kid="rsa-1")
    with pytest.raises(Unauthorized, match="verifies RS256 only"):
        v.verify(es_token_naming_rsa_key)


def test_signature_by_another_key_is_refused(tmp_path: Path) -> None:
    v = _verifier(tmp_path, keys=[RSA_JWK])
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(Unauthorized, match="invalid token"):
        v.verify(tokens.mint("eve", other, algorithm="RS256", kid="rsa-1"))
    with pytest.raises(Unauthorized, match="invalid token"):
        v.verify(tokens.mint("eve", "not-the-secret-but-long-enough-0123456789"))


def test_unknown_kid_is_refused(tmp_path: Path) -> None:
    v = _verifier(tmp_path, keys=[RSA_JWK])
    with pytest.raises(Unauthorized, match="unknown key"):
        v.verify(tokens.mint("bob", RSA_KEY, algorithm="RS256", kid="rsa-404"))


def test_two_keys_of_one_algorithm_need_a_kid(tmp_path: Path) -> None:
    second = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    v = _verifier(tmp_path, keys=[RSA_JWK, _jwk(second.public_key(), "rsa-2", "RS256")])
    with pytest.raises(Unauthorized, match="names no key"):
        v.verify(tokens.mint("bob", RSA_KEY, algorithm="RS256"))
    assert v.verify(tokens.mint("bob", second, algorithm="RS256", kid="rsa-2")).subject == "bob"


def test_symmetric_and_encryption_keys_in_a_jwks_are_ignored(tmp_path: Path) -> None:
    oct_key = {"kty": "oct", "kid": "oct-1", "k": _b64(b"k" * 32), "alg": "HS256"}
    enc_key = {**RSA_JWK, "kid": "rsa-enc", "use": "enc"}
    v = _verifier(tmp_path, keys=[oct_key, enc_key])
    assert v.ring.jwks == []
    with pytest.raises(Unauthorized):
        v.verify(_forge({"alg": "HS256", "kid": "oct-1"}, _claims(), b"k" * 32))


def test_expiry_is_checked_with_a_small_skew(tmp_path: Path) -> None:
    v = _verifier(tmp_path, leeway_s=30)
    assert v.verify(tokens.mint("a", SECRET, ttl_s=-10)).subject == "a"  # 10 s late: within the skew
    with pytest.raises(Unauthorized, match="expired"):
        v.verify(tokens.mint("a", SECRET, ttl_s=-60))


def test_not_before_is_checked_with_a_small_skew(tmp_path: Path) -> None:
    v = _verifier(tmp_path, leeway_s=30)
    now = time.time()
    assert v.verify(tokens.mint("a", SECRET, not_before_s=now + 10)).subject == "a"
    with pytest.raises(Unauthorized, match="not valid yet"):
        v.verify(tokens.mint("a", SECRET, not_before_s=now + 120))


@pytest.mark.parametrize("claim,value", [("iss", "someone-else"), ("aud", "another-api")])
def test_issuer_and_audience_must_match(tmp_path: Path, claim: str, value: str) -> None:
    v = _verifier(tmp_path)
    token = jwt.encode(_claims(**{claim: value}), SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized, match="invalid token"):
        v.verify(token)


@pytest.mark.parametrize("missing", ["exp", "sub", "iss", "aud"])
def test_required_claims(tmp_path: Path, missing: str) -> None:
    v = _verifier(tmp_path)
    claims = _claims()
    del claims[missing]
    with pytest.raises(Unauthorized):
        v.verify(jwt.encode(claims, SECRET, algorithm="HS256"))


@pytest.mark.parametrize("sub", ["", 42, None])
def test_subject_must_be_a_non_empty_string(tmp_path: Path, sub: object) -> None:
    v = _verifier(tmp_path)
    with pytest.raises(Unauthorized):
        v.verify(_forge({"alg": "HS256"}, _claims(sub=sub), SECRET.encode()))


@pytest.mark.parametrize("garbage", ["x", "a.b.c", "eyJhbGciOiJIUzI1NiJ9..", "....", "🙂.🙂.🙂"])
def test_garbage_is_unauthorized_not_an_error(tmp_path: Path, garbage: str) -> None:
    with pytest.raises(Unauthorized):
        _verifier(tmp_path).verify(garbage)


def test_jwks_file_is_reloaded_when_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "JWKS_RECHECK_S", 0.0)
    v = _verifier(tmp_path, keys=[RSA_JWK])
    es = tokens.mint("carol", EC_KEY, algorithm="ES256", kid="ec-1")
    with pytest.raises(Unauthorized):
        v.verify(es)
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(_jwks(RSA_JWK, EC_JWK)))
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert v.verify(es).subject == "carol"


def test_a_missing_jwks_file_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not readable"):
        tokens.Verifier(SECRET, issuer="tidewire", audience="tidewire", jwks_file=str(tmp_path / "nope.json"))


def test_the_dev_secret_is_ignored_once_a_jwks_file_is_configured(tmp_path: Path) -> None:
    f = tmp_path / "jwks.json"
    f.write_text(json.dumps(_jwks(RSA_JWK)))
    v = auth.verifier(GatewaySettings(jwks_file=str(f)))
    with pytest.raises(Unauthorized):
        v.verify(tokens.mint("mallory", DEV_JWT_SECRET))
    assert v.verify(tokens.mint("bob", RSA_KEY, algorithm="RS256", kid="rsa-1")).subject == "bob"
    own = auth.verifier(GatewaySettings(jwks_file=str(f), jwt_secret=SECRET))
    assert own.verify(tokens.mint("alice", SECRET)).subject == "alice"


def test_authenticate_reads_header_or_query(tmp_path: Path) -> None:
    settings = GatewaySettings(jwt_secret=SECRET)
    token = tokens.mint("alice", SECRET)
    assert (
        auth.authenticate(
            make_mocked_request("GET", "/", headers={"Authorization": f"Bearer {token}"}), settings
        ).subject
        == "alice"
    )
    assert (
        auth.authenticate(make_mocked_request("GET", f"/?access_token={token}"), settings).subject == "alice"
    )
    with pytest.raises(Unauthorized, match="missing"):
        auth.authenticate(make_mocked_request("GET", "/"), settings)
    with pytest.raises(Unauthorized, match="too long"):
        auth.authenticate(
            make_mocked_request("GET", "/", headers={"Authorization": "Bearer " + "a" * 9000}), settings
        )


@pytest.mark.parametrize(
    "origin,allowed,ok",
    [
        (None, (), True),
        ("http://gw.test:8080", (), True),
        ("https://gw.test:8080", (), True),
        ("https://app.example", ("https://app.example",), True),
        ("https://evil.example", ("https://app.example",), False),
        ("https://evil.example", ("*",), True),
        ("http://gw.test:8080.evil.example", (), False),
        ("http://gw.test:8080/path", (), False),
        ("null", (), False),
        ("http://[::1", (), False),
    ],
)
def test_origin_allowlist(origin: str | None, allowed: tuple[str, ...], ok: bool) -> None:
    headers = {"Host": "gw.test:8080"}
    if origin is not None:
        headers["Origin"] = origin
    request = make_mocked_request("GET", "/v1/ws", headers=headers)
    settings = GatewaySettings(allowed_origins=allowed)
    if ok:
        auth.check_origin(request, settings)
    else:
        with pytest.raises(Forbidden):
            auth.check_origin(request, settings)
