"""Client authentication by assertion (issue 26), in-process: the assertion builder checked by an
independent verifier (joserfc, not the PyJWT that signs), the requests the flows build for each
method, redaction, and the dev IdP's authenticators against the broker's real sessions."""

from __future__ import annotations

import base64
import dataclasses
import json
import ssl
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwt as jose_jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, OctKey, RSAKey

from dc_broker.config import Profile
from dc_broker.devidp.realm import DevClient
from dc_broker.devserver import DevIdP, demo_realm
from dc_broker.errors import ConfigError, UpstreamTransient
from dc_broker.idp import assertions, clientkeys, oidc
from dc_broker.idp.oidc import Endpoints, HttpResponse
from dc_broker.idp.transport import ClientCert, IdpTransport
from dc_broker.secret import Secret
from dc_broker.serve import ops
from dc_broker.sessions import flows
from dc_broker.sessions.registry import Sessions
from dc_broker.sessions.session import Session
from dc_broker.sessions.states import State
from dc_broker.store import MemoryStore
from dc_broker.tokens import Credentials
from dc_token.errors import CredentialsRejected, LoginRequired, Overloaded
from tests.conftest import running

IDP = "http://localhost"
ISSUER = f"{IDP}/realms/demo"
TOKEN_URL = f"{ISSUER}/protocol/openid-connect/token"
NOW = 1_700_000_000.0
SECRET = "svc-secret-of-thirty-two-bytes-or-more"


def verify(assertion: str, jwks: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """joserfc's decode against the public JWKS: (header, claims); raises on a bad signature."""
    token = jose_jwt.decode(assertion, KeySet.import_key_set(jwks))
    return dict(token.header), dict(token.claims)


@pytest.mark.parametrize(
    ("key_type", "alg", "kty", "strength"), [("ec", "ES256", ECKey, "secp256r1"), ("rsa", "RS256", RSAKey, 2048)]
)
def test_a_signed_assertion_verifies_with_the_public_jwks_alone(
    key_type: str, alg: str, kty: Any, strength: str | int
) -> None:
    key = clientkeys.generate(key_type, now=NOW)
    private = key.private_key()  # EC P-256, or RSA 2048 when asked (the issue's sizes)
    assert (private.curve.name if isinstance(private, ec.EllipticCurvePrivateKey) else private.key_size) == strength
    keys = clientkeys.KeySet(key)
    need = oidc.AssertionNeeded("private_key_jwt", "svc", TOKEN_URL, keys.to_secret())
    value = assertions.signed(need, now=NOW + 0.7, jti="jti-1")
    jwks = json.loads(assertions.public_jwks(keys))
    header, claims = verify(value, jwks)
    assert header == {"alg": alg, "kid": key.kid, "typ": "JWT"}
    assert claims == {
        "iss": "svc",
        "sub": "svc",
        "aud": TOKEN_URL,
        "jti": "jti-1",
        "iat": int(NOW),
        "exp": int(NOW) + 60,
    }
    # the kid is the public key's RFC 7638 thumbprint, as joserfc computes it
    (public,) = jwks["keys"]
    assert kty.import_key(public).thumbprint() == key.kid
    assert "d" not in public and public["use"] == "sig" and public["alg"] == alg
    # another key does not verify it, even under this key's kid
    other = clientkeys.KeySet(clientkeys.generate(key_type, now=NOW)).public_jwks()
    other["keys"][0]["kid"] = key.kid
    with pytest.raises(JoseError):
        verify(value, other)


def test_each_request_gets_a_fresh_jti_and_the_clock_it_is_given() -> None:
    keys = clientkeys.KeySet(clientkeys.generate("ec", now=NOW))
    client = oidc.ClientCredentials("svc", "private_key_jwt", keys=keys.to_secret(), audience=ISSUER)
    req = oidc.build_client_credentials(TOKEN_URL, client)
    assert req.form["client_assertion_type"] == oidc.JWT_BEARER and "client_assertion" not in req.form
    seen = []
    for i, jti in enumerate(["a" * 32, "b" * 32]):
        done = assertions.complete(req, now=NOW + 100 * i, jti=jti)
        assert done.assertion is None and req.assertion is not None  # the built request is unchanged
        _, claims = verify(done.form["client_assertion"], keys.public_jwks())
        assert claims["jti"] == jti and claims["iat"] == int(NOW) + 100 * i and claims["aud"] == ISSUER
        seen.append(done.form["client_assertion"])
    assert seen[0] != seen[1]


def test_client_secret_jwt_is_hs256_over_the_secret() -> None:
    client = oidc.ClientCredentials(
        "svc", "client_secret_jwt", Secret("s3cret-value-of-at-least-32-bytes"), audience=TOKEN_URL
    )
    req = assertions.complete(oidc.build_client_credentials(TOKEN_URL, client), now=NOW, jti="j")
    assert "client_secret" not in req.form and req.headers.get("Authorization") is None
    header, claims = verify(
        req.form["client_assertion"], {"keys": [OctKey.import_key(b"s3cret-value-of-at-least-32-bytes").as_dict()]}
    )
    assert header["alg"] == "HS256" and claims["sub"] == "svc"


def test_a_next_key_signs_only_when_asked_and_activation_drops_the_old_one() -> None:
    first = clientkeys.KeySet(clientkeys.generate("ec", now=NOW))
    creds, rotating = clientkeys.changed(Credentials(client_keys=first.to_secret()), new_key="rsa", now=NOW)
    assert rotating.active == first.active and rotating.next is not None
    assert [k["kid"] for k in rotating.public_jwks()["keys"]] == [first.active.kid, rotating.next.kid]
    need = oidc.AssertionNeeded("private_key_jwt", "svc", TOKEN_URL, creds.client_keys)
    assert verify(assertions.signed(need, now=NOW, jti="1"), first.public_jwks())[0]["kid"] == first.active.kid
    header, _ = verify(assertions.signed(need, now=NOW, jti="2", use_next=True), rotating.public_jwks())
    assert header["kid"] == rotating.next.kid
    _, done = clientkeys.changed(creds, activate=True, now=NOW)
    assert done.active == rotating.next and done.next is None
    with pytest.raises(ConfigError, match="no next key"):
        clientkeys.changed(Credentials(client_keys=done.to_secret()), activate=True, now=NOW)


def test_nothing_shows_the_private_key_or_an_assertion() -> None:
    keys = clientkeys.KeySet(clientkeys.generate("ec", now=NOW))
    pem = keys.active.pem.reveal()
    client = oidc.ClientCredentials("svc", "private_key_jwt", keys=keys.to_secret(), audience=TOKEN_URL)
    req = assertions.complete(oidc.build_client_credentials(TOKEN_URL, client), now=NOW, jti="j")
    value = req.form["client_assertion"]
    for shown in (
        repr(req),
        repr(client),
        repr(keys),
        repr(keys.active),
        repr(oidc.AssertionNeeded("m", "c", "a", keys.to_secret())),
    ):
        assert pem not in shown and value not in shown and "PRIVATE" not in shown
    # an IdP that echoes the assertion has it redacted: it is one of the request's secrets
    echo = HttpResponse(401, {}, json.dumps({"error": "invalid_client", "error_description": f"bad {value}"}).encode())
    with pytest.raises(oidc.OAuthError) as caught:
        oidc.check_error(echo, req.secrets())
    assert value not in str(caught.value) and "[redacted]" in caught.value.description


def endpoints() -> Endpoints:
    return Endpoints(token=TOKEN_URL, issuer=ISSUER, revocation=f"{ISSUER}/protocol/openid-connect/revoke")


def test_the_audience_follows_the_profile() -> None:
    base = {
        "name": "p",
        "client_id": "svc",
        "token_url": TOKEN_URL,
        "auth_method": "private_key_jwt",
        "grant": "device",
    }
    assert oidc.assertion_audience(Profile(**base), endpoints()) == TOKEN_URL
    assert oidc.assertion_audience(Profile(**base, assertion_audience="issuer"), endpoints()) == ISSUER
    assert oidc.assertion_audience(Profile(**base, assertion_audience="https://op.example/"), endpoints()) == (
        "https://op.example/"
    )
    with pytest.raises(ConfigError, match="issuer is not known"):
        oidc.assertion_audience(Profile(**base, assertion_audience="issuer"), Endpoints(token=TOKEN_URL))


def test_each_method_builds_its_request() -> None:
    def client(method: str, **extra: Any) -> oidc.ClientCredentials:
        p = Profile(
            name="p", client_id="svc", token_url=TOKEN_URL, grant="client_credentials", auth_method=method, **extra
        )
        return oidc.client_of(p, Credentials(), endpoints())

    tls = oidc.build_client_credentials(TOKEN_URL, client("tls_client_auth", client_cert="/c.pem"))
    assert tls.form == {"grant_type": "client_credentials", "client_id": "svc"} and tls.assertion is None
    fed = oidc.build_client_credentials(TOKEN_URL, client("client_assertion_file", assertion_file="/t"))
    # no client_id: Keycloak refuses one that differs from the federated assertion's sub
    assert fed.form == {"grant_type": "client_credentials", "client_assertion_type": oidc.JWT_BEARER}
    spiffe = client("client_assertion_file", assertion_file="/t", assertion_type="jwt-spiffe")
    assert oidc.build_client_credentials(TOKEN_URL, spiffe).form["client_assertion_type"] == oidc.JWT_SPIFFE
    with pytest.raises(LoginRequired, match="rotate p --key"):
        client("private_key_jwt")


def jwt_file(path: Path, claims: dict[str, Any]) -> None:
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    path.write_text(f"eyJhbGciOiJSUzI1NiJ9.{body}.c2ln\n")


def test_an_assertion_file_is_read_each_time_and_refused_when_missing_empty_or_expired(tmp_path: Path) -> None:
    path = tmp_path / "token"
    client = oidc.ClientCredentials("svc", "client_assertion_file", assertion_file=str(path))
    req = oidc.build_client_credentials(TOKEN_URL, client)
    with pytest.raises(assertions.AssertionFileProblem, match=f"the client assertion file {path} does not exist"):
        assertions.complete(req, now=NOW, jti="x")
    path.write_text("")
    with pytest.raises(assertions.AssertionFileProblem, match="is empty"):
        assertions.complete(req, now=NOW, jti="x")
    jwt_file(path, {"iss": "k8s", "exp": NOW + 600})
    first = assertions.complete(req, now=NOW, jti="x").form["client_assertion"]
    jwt_file(path, {"iss": "k8s", "exp": NOW + 900})  # renewed by its agent: picked up at once
    assert assertions.complete(req, now=NOW, jti="x").form["client_assertion"] != first
    with pytest.raises(assertions.AssertionFileProblem, match="expired 100 s ago"):
        assertions.complete(req, now=NOW + 1000, jti="x")


# ---------------------------------------------------------------- against the dev IdP, in-process


def jwt_realm_idp(**client: Any) -> DevIdP:
    realm = demo_realm()
    realm.clients.append(DevClient("svc", service_account_roles=["dc-api"], **client))
    return DevIdP([realm])


def svc_profile(method: str = "private_key_jwt", **extra: Any) -> Profile:
    return Profile(
        name="svc", client_id="svc", grant="client_credentials", server=IDP, tenant="demo", legacy_paths=False,
        auth_method=method, **extra,
    )  # fmt: skip


async def test_the_dev_idp_accepts_a_registered_key_and_refuses_a_replay_and_an_unknown_key() -> None:
    keys = clientkeys.KeySet(clientkeys.generate("ec", now=time.time()))
    idp = jwt_realm_idp(auth="client-jwt", jwks=keys.public_jwks())
    transport = IdpTransport(transport=httpx.ASGITransport(app=idp.app))
    session = Session(svc_profile(), MemoryStore({"svc": Credentials(client_keys=keys.to_secret())}), transport)
    await session.verify()
    await session.verify()
    used = idp._state.assertions.accepted
    assert len(used) == 2 and len({verify(a, keys.public_jwks())[1]["jti"] for a in used}) == 2
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=idp.app)) as http:
        form = {
            "grant_type": "client_credentials",
            "client_assertion_type": oidc.JWT_BEARER,
            "client_assertion": used[0],
        }
        replay = await http.post(f"{IDP}/realms/demo/protocol/openid-connect/token", data=form)
    assert replay.status_code == 400
    assert replay.json() == {"error": "invalid_client", "error_description": "Token reuse detected"}
    stranger = clientkeys.KeySet(clientkeys.generate("ec", now=time.time()))
    wrong = Session(svc_profile(), MemoryStore({"svc": Credentials(client_keys=stranger.to_secret())}), transport)
    with pytest.raises(CredentialsRejected) as refused:
        await wrong.verify()
    assert "Unable to load public key" in str(refused.value) and "keys svc --jwks" in str(refused.value)
    await transport.aclose()


@pytest.mark.parametrize(
    ("claims", "description"),
    [
        ({"aud": "https://elsewhere.example/token"}, "Invalid token audience"),
        ({"exp": -100, "iat": -160}, "Token is not active"),
        ({"exp": 300}, "Token was issued too far in the past to be used now"),  # lives longer than 60 s
        ({"jti": None}, "Token jti claim is required"),
    ],
    ids=["audience", "expired", "too-long", "no-jti"],
)
async def test_the_dev_idp_answers_each_bad_assertion_as_keycloak_does(
    claims: dict[str, Any], description: str
) -> None:
    keys = clientkeys.KeySet(clientkeys.generate("ec", now=time.time()))
    idp = jwt_realm_idp(auth="client-jwt", jwks=keys.public_jwks())
    now = time.time()
    payload = assertions.claims("svc", TOKEN_URL, now=now, jti="j1")
    for name, value in claims.items():
        if value is None:
            del payload[name]
        else:
            payload[name] = value if name == "aud" else int(now) + value
    if "iat" not in claims and "exp" in claims:
        payload["iat"] = int(now) - 100
    value = assertions.sign_with_key(keys.active, payload)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=idp.app)) as http:
        form = {"grant_type": "client_credentials", "client_assertion_type": oidc.JWT_BEARER, "client_assertion": value}
        answer = await http.post(TOKEN_URL, data=form)
    assert (answer.status_code, answer.json()) == (400, {"error": "invalid_client", "error_description": description})


def _another_signature(keys: clientkeys.KeySet, payload: dict[str, Any]) -> str:
    """Signed with a key the client never registered, under the registered key's kid."""
    impostor = dataclasses.replace(clientkeys.generate("ec", now=time.time()), kid=keys.active.kid)
    return assertions.sign_with_key(impostor, payload)


@pytest.mark.parametrize(
    ("auth", "sign", "description"),
    [
        (
            "client-jwt",
            _another_signature,
            "Client authentication with signed JWT failed: Signature on JWT token failed validation",
        ),
        ("client-jwt", lambda keys, payload: assertions.sign_with_secret(SECRET, payload), "Invalid signature algorithm"),
        ("client-secret-jwt", lambda keys, payload: assertions.sign_with_key(keys.active, payload), "Invalid signature algorithm"),
    ],
    ids=["wrong-signature-known-kid", "hs256-for-signed-jwt", "es256-for-secret-jwt"],
)  # fmt: skip
async def test_the_dev_idp_answers_a_wrong_signature_or_algorithm_as_keycloak_does(
    auth: str, sign: Any, description: str
) -> None:
    """A signature that does not verify under the kid it names, and an algorithm the client's
    authenticator does not take (a MAC for Signed JWT, a key signature for Signed JWT with Client
    Secret): 400 invalid_client with Keycloak's descriptions (docs/keycloak.md)."""
    keys = clientkeys.KeySet(clientkeys.generate("ec", now=time.time()))
    idp = jwt_realm_idp(auth=auth, jwks=keys.public_jwks(), secret=SECRET)
    payload = assertions.claims("svc", TOKEN_URL, now=time.time(), jti="j-signature")
    form = {"grant_type": "client_credentials", "client_assertion_type": oidc.JWT_BEARER}
    form["client_assertion"] = sign(keys, payload)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=idp.app)) as http:
        answer = await http.post(TOKEN_URL, data=form)
    assert (answer.status_code, answer.json()) == (400, {"error": "invalid_client", "error_description": description})
    assert idp._state.assertions.accepted == []  # nothing was taken for the client's


@pytest.mark.parametrize(
    ("change", "status", "description"),
    [
        ({"sub": None}, 400, "Token sub claim is required"),
        ({"client_id": "dc-cli"}, 400, "client_id parameter does not match sub claim"),
        ({"iss": "https://other-issuer.example"}, 401, "Invalid client or Invalid client credentials"),
    ],
    ids=["no-sub", "client-id-not-sub", "iss-not-sub"],
)
async def test_the_dev_idp_takes_the_client_from_the_assertion_as_keycloak_does(
    change: dict[str, Any], status: int, description: str
) -> None:
    """Keycloak's AbstractJWTClientValidator.validateClient: ``sub`` names the client, a ``client_id``
    beside it must be the same, and an assertion whose ``iss`` is not its ``sub`` is not the
    client's own (another issuer's: no client is authenticated)."""
    keys = clientkeys.KeySet(clientkeys.generate("ec", now=time.time()))
    idp = jwt_realm_idp(auth="client-jwt", jwks=keys.public_jwks())
    payload = assertions.claims("svc", TOKEN_URL, now=time.time(), jti="j-client")
    form = {"grant_type": "client_credentials", "client_assertion_type": oidc.JWT_BEARER, "client_id": "svc"}
    for name, value in change.items():
        if name == "client_id":
            form[name] = value
        elif value is None:
            del payload[name]
        else:
            payload[name] = value
    form["client_assertion"] = assertions.sign_with_key(keys.active, payload)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=idp.app)) as http:
        answer = await http.post(TOKEN_URL, data=form)
    assert (answer.status_code, answer.json()) == (
        status,
        {"error": "invalid_client", "error_description": description},
    )


@pytest.mark.parametrize("method", ["private_key_jwt", "client_secret_jwt"])
async def test_an_idp_that_echoes_the_assertion_sent_never_gets_it_shown(
    method: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The assertion is made at the edge, after the flow built the request: an IdP (or a proxy in
    front of it) that echoes it back, raw or form-encoded, has it redacted all the same."""
    sent: list[str] = []

    def echo(request: httpx.Request) -> httpx.Response:
        form = dict(httpx.QueryParams(request.content.decode()))
        sent.append(form["client_assertion"])
        said = f"bad assertion {form['client_assertion']} / {request.content.decode()}"
        return httpx.Response(400, json={"error": "invalid_client", "error_description": said})

    keys = clientkeys.KeySet(clientkeys.generate("ec", now=time.time()))
    creds = (
        Credentials(client_keys=keys.to_secret())
        if method == "private_key_jwt"
        else Credentials(client_secret=Secret("svc-secret-of-thirty-two-bytes-or-more"))
    )
    transport = IdpTransport(transport=httpx.MockTransport(echo))
    session = Session(svc_profile(method), MemoryStore({"svc": creds}), transport)
    with caplog.at_level("DEBUG"), pytest.raises(CredentialsRejected) as refused:
        await session.verify()
    await transport.aclose()
    assert len(sent) == 1
    shown = [str(refused.value), repr(refused.value), caplog.text]
    for text in shown:
        assert sent[0] not in text
        assert sent[0][-40:] not in text  # not even its signature
    assert "[redacted]" in str(refused.value)


async def test_client_secret_jwt_against_the_dev_idp() -> None:
    idp = jwt_realm_idp(auth="client-secret-jwt", secret="svc-secret-of-thirty-two-bytes-or-more")
    transport = IdpTransport(transport=httpx.ASGITransport(app=idp.app))
    good = Session(
        svc_profile("client_secret_jwt"),
        MemoryStore({"svc": Credentials(client_secret=Secret("svc-secret-of-thirty-two-bytes-or-more"))}),
        transport,
    )
    assert (await good.verify()).access_token
    bad = Session(
        svc_profile("client_secret_jwt"),
        MemoryStore({"svc": Credentials(client_secret=Secret("a-wrong-secret-of-thirty-two-bytes"))}),
        transport,
    )
    with pytest.raises(CredentialsRejected, match="Signature on JWT token by client secret failed validation"):
        await bad.verify()
    await transport.aclose()


async def test_a_key_check_spends_nothing_and_tells_a_known_key_from_an_unknown_one() -> None:
    keys = clientkeys.KeySet(clientkeys.generate("ec", now=time.time()))
    idp = jwt_realm_idp(auth="client-jwt", jwks=keys.public_jwks())
    transport = IdpTransport(transport=httpx.ASGITransport(app=idp.app))
    creds, rotating = clientkeys.changed(Credentials(client_keys=keys.to_secret()), new_key="ec", now=time.time())
    session = Session(svc_profile(), MemoryStore({"svc": creds}), transport)
    assert await session.check_client() is True
    with pytest.raises(CredentialsRejected, match="Unable to load public key"):
        await session.check_client(next_key=True)  # not registered yet
    idp.realm("demo").client("svc").jwks = rotating.public_jwks()  # type: ignore[union-attr]
    assert await session.check_client(next_key=True) is True
    assert idp.stats.total == 3 and idp.active_sessions("demo") == 0  # no token was granted
    await transport.aclose()


def test_a_key_set_record_that_is_not_one_is_named_not_shown() -> None:
    with pytest.raises(clientkeys.KeySetCorrupt) as caught:
        clientkeys.KeySet.from_secret(Secret('{"format": 1, "active": {"pem": "-----BEGIN PRIVATE KEY-----xyz"}}'))
    assert "xyz" not in str(caught.value)


def test_a_flow_step_never_carries_a_made_assertion() -> None:
    """The flows stay pure: what they yield still needs its assertion; only the edge makes one."""
    keys = clientkeys.KeySet(clientkeys.generate("ec", now=NOW))
    login = flows.Login(svc_profile(), Credentials(client_keys=keys.to_secret()), endpoints())
    step = next(flows.obtain(login))
    assert isinstance(step, oidc.HttpRequest) and step.assertion is not None and "client_assertion" not in step.form


# ---------------------------------------------------------------- tls_client_auth: files that cannot be presented


def _unusable_cert(tmp_path: Path, case: str) -> ClientCert:
    from tests.test_client_auth_e2e import ClientCA  # the e2e tests' CA (cryptography only)

    ca = ClientCA(tmp_path)
    cert, key = ca.issue("dc-mtls", days=-0.001 if case == "expired" else 30)
    if case == "encrypted":
        loaded = serialization.load_pem_private_key(Path(key).read_bytes(), None)
        Path(key).write_bytes(
            loaded.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"a passphrase"),
            )
        )
    elif case == "mismatched":
        key = ca.issue("dc-mtls", name="another")[1]
    elif case == "no-key":
        return ClientCert(cert)  # the certificate file alone, said to hold its key
    return ClientCert(cert, key)


@pytest.mark.parametrize(
    ("case", "said"),
    [
        ("expired", r"the client certificate \S+client\.pem \(CN=dc-mtls\) expired at .* UTC; renew it"),
        ("encrypted", r"the client key \S+client\.key is encrypted \(it asks for a passphrase\): dc-broker needs"),
        ("mismatched", r"the client certificate \S+client\.pem does not match the key \S+another\.key"),
        ("no-key", r"the client certificate \S+client\.pem holds no private key: give its key file \(--client-key\)"),
    ],
)
async def test_a_client_certificate_that_cannot_be_presented_is_named_and_nothing_is_sent(
    tmp_path: Path, case: str, said: str
) -> None:
    """Refused before any request leaves, with the file and the fix named; an encrypted key never
    makes OpenSSL ask for a passphrase on the terminal (which would hold the whole event loop)."""
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={"access_token": "at", "token_type": "Bearer", "expires_in": 300})

    transport = IdpTransport(transport=httpx.MockTransport(record))
    req = oidc.build_client_credentials(TOKEN_URL, oidc.ClientCredentials("dc-mtls", None))
    try:
        with pytest.raises(UpstreamTransient, match=said):
            await transport.send(req, client_cert=_unusable_cert(tmp_path, case))
    finally:
        await transport.aclose()
    assert sent == []


# ---------------------------------------------------------------- key changes that meet a slow IdP


def slow_svc(keys: clientkeys.KeySet) -> tuple[DevIdP, Sessions, MemoryStore]:
    """A private_key_jwt profile ``svc`` whose client accepts ``keys`` (and their next key), at a
    dev IdP that takes 3 s for every answer."""
    idp = DevIdP([demo_realm()])  # the wall clock: a probe session (ops._probe) signs with it
    idp.realm("demo").clients.append(DevClient("svc", service_account_roles=["dc-api"], auth="client-jwt", jwks=keys.public_jwks()))  # type: ignore[union-attr]  # fmt: skip
    store = MemoryStore({"svc": Credentials(client_keys=keys.to_secret())})
    sessions = Sessions({"svc": svc_profile()}, store, IdpTransport(transport=httpx.ASGITransport(app=idp.app)))
    idp.faults.latency = 3.0
    idp.faults.all_endpoints = True  # the revocation endpoint too
    return idp, sessions, store


async def test_a_key_rotated_while_the_next_key_is_checked_is_not_activated_unchecked(autojump_clock: Any) -> None:
    """`rotate --key --activate` checks the next key at the IdP; a second `rotate --key` landing
    meanwhile made another next key: activating it would sign with a key nobody checked."""
    first = clientkeys.KeySet(clientkeys.generate("ec", now=time.time()))
    creds, rotating = clientkeys.changed(Credentials(client_keys=first.to_secret()), new_key="ec", now=time.time())
    _, sessions, store = slow_svc(rotating)
    store.set_credentials("svc", creds)
    state = SimpleNamespace(sessions=sessions, clock=trio.current_time)
    session = sessions.lookup("svc")
    outcome: list[BaseException | dict[str, Any]] = []

    async def activate() -> None:
        try:
            outcome.append(await ops._set_keys(state, session, None, True, True))  # type: ignore[arg-type]
        except Overloaded as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(activate)
        await trio.sleep(1)  # the check is at the IdP
        again, _ = clientkeys.changed(store.credentials("svc"), new_key="ec", now=time.time())
        store.set_credentials("svc", again)  # another `rotate --key`: a new next key
    assert isinstance(outcome[0], Overloaded) and "nothing was activated" in str(outcome[0])
    assert store.credentials("svc") == again  # neither the checked key nor the old set came back


async def test_a_key_activated_while_a_logout_is_at_the_idp_stays(autojump_clock: Any) -> None:
    """A logout reads the credentials, asks the IdP to end the login, then writes what it keeps: a
    key activated while the IdP was asked is kept, not the set from before."""
    first = clientkeys.KeySet(clientkeys.generate("ec", now=time.time()))
    creds, rotating = clientkeys.changed(Credentials(client_keys=first.to_secret()), new_key="ec", now=time.time())
    idp, sessions, store = slow_svc(rotating)
    store.set_credentials("svc", creds)
    session = sessions.lookup("svc")
    activated, _ = clientkeys.changed(creds, activate=True, now=time.time())
    async with running(sessions.run) as nursery:
        await session.get()
        nursery.start_soon(session.logout)
        assert idp.stats.requests["revoke"] == 0
        await trio.sleep(1)  # the logout is at the IdP
        store.set_credentials("svc", activated)
        await trio.sleep(10)
    assert idp.stats.requests["revoke"] == 1 and session.state is State.LOGIN_REQUIRED
    assert store.credentials("svc").client_keys == activated.client_keys


async def test_a_client_key_others_may_read_is_said_once_and_the_roots_are_every_profiles(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key file of mode 0644 is used but logged (once per file version), and a certificate without
    a ca_bundle keeps the trust roots every other profile has (httpx's), not the system's."""
    import certifi

    from dc_broker.idp import transport as transport_module
    from tests.test_client_auth_e2e import ClientCA

    cert, key = ClientCA(tmp_path).issue("dc-mtls")
    Path(key).chmod(0o644)
    contexts: list[Any] = []
    real_load = transport_module._load_cert_chain
    monkeypatch.setattr(transport_module, "_load_cert_chain", lambda ctx, c: (contexts.append(ctx), real_load(ctx, c)))

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"access_token": "at", "token_type": "Bearer", "expires_in": 300})

    transport = IdpTransport(transport=httpx.MockTransport(answer))
    req = oidc.build_client_credentials(TOKEN_URL, oidc.ClientCredentials("dc-mtls", None))
    try:
        with caplog.at_level("WARNING"):
            for _ in range(2):
                assert (await transport.send(req, client_cert=ClientCert(cert, key))).status == 200
    finally:
        await transport.aclose()
    said = [r.getMessage() for r in caplog.records if "can be read by others" in r.getMessage()]
    assert said == [
        f"the client key {key} can be read by others (mode 0644): make it readable by the broker's user only "
        f"(`chmod 600 {key}`)"
    ]
    roots = ssl.create_default_context(cafile=certifi.where()).get_ca_certs()
    assert len(contexts) == 1 and len(contexts[0].get_ca_certs()) == len(roots)


@pytest.mark.parametrize(
    ("auth", "line"),
    [
        (
            {"method": "tls_client_auth", "cert": "/c.pem", "cert_subject": "CN=svc", "cert_expires_in": 40 * 86400},
            "svc: client certificate /c.pem (CN=svc) expires in 40d 0h",
        ),
        (
            {"method": "tls_client_auth", "cert": "/c.pem", "cert_subject": "CN=svc", "cert_expires_in": 2 * 86400},
            "svc: client certificate /c.pem (CN=svc) expires in 2d 0h; renew it",
        ),
        (
            {"method": "tls_client_auth", "cert": "/c.pem", "cert_expires_in": -3600},
            "svc: client certificate /c.pem EXPIRED 60m00s ago: renew it",
        ),
        # an assertion file lives minutes; the agent that writes it renews it: no "renew it" while it lives
        (
            {"method": "client_assertion_file", "assertion_file": "/t.jwt", "assertion_expires_in": 600},
            "svc: client assertion file /t.jwt expires in 10m00s",
        ),
        (
            {"method": "client_assertion_file", "assertion_file": "/t.jwt", "assertion_expires_in": -120},
            "svc: client assertion file /t.jwt EXPIRED 2m00s ago: whatever writes it stopped renewing it",
        ),
        (
            {"method": "client_assertion_file", "assertion_file": "/t.jwt", "assertion_expires_in": None},
            "svc: client assertion file /t.jwt cannot be read",
        ),
    ],
)
def test_how_a_client_authenticates_is_one_line_and_says_renew_only_where_a_person_renews(
    auth: dict[str, object], line: str
) -> None:
    from dc_broker.cli.talk import _client_auth_note

    assert _client_auth_note({"profile": "svc", "client_auth": auth}) == line
