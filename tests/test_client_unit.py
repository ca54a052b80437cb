"""The client's pure parts, no broker: the token cache, dc-token's command line, the ExecCredential shape,
and BrokerAuth's flow stepped by hand and driven by httpx over a MockTransport."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import httpx
import pytest
import trio

from dc_token import cli, sync
from dc_token.errors import BrokerTimeout
from dc_token.httpx import RETRY_MIN_TTL, BrokerAuth, GetToken, Invalidate
from dc_token.sync import CACHE_MARGIN, Token, TokenCache, TokenClient
from tests.sockets import accept_in_thread


def tok(value: str = "t1", profile: str = "acme", expires_at: float = 2e9) -> Token:
    return Token(value, "Bearer", expires_at, "openid", profile)


# ---------------------------------------------------------------- the cache


def test_cache_serves_while_min_ttl_plus_margin_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("dc_token.cache._monotonic", lambda: now[0])
    cache = TokenCache()
    cache.put(tok(), deadline=100.0 + 300)
    assert cache.get("acme", 0) == tok()
    assert cache.get("acme", 300 - CACHE_MARGIN - 0.01) == tok()
    assert cache.get("acme", 300 - CACHE_MARGIN) is None
    assert cache.get("other", 0) is None
    now[0] = 100.0 + 300 - CACHE_MARGIN
    assert cache.get("acme", 0) is None


def test_cache_keeps_the_newer_token_and_forgets_only_the_named_one() -> None:
    cache = TokenCache()
    cache.put(tok("new"), deadline=2e9)
    cache.put(tok("old"), deadline=1e9)
    assert cache.get("acme", 0) == tok("new")
    cache.forget("acme", "old")
    assert cache.get("acme", 0) == tok("new")
    cache.forget("acme", "new")
    assert cache.get("acme", 0) is None


def test_cache_never_outlives_the_brokers_next_refresh(monkeypatch: pytest.MonkeyPatch) -> None:
    import dc_token.cache as client_cache

    now = [1000.0]
    monkeypatch.setattr(client_cache, "_monotonic", lambda: now[0])
    cache = TokenCache()
    # valid for 300 s, but the broker replaces it in 225 s (and DOT-like IdPs revoke it then)
    cache.put(tok("t"), *client_cache.token_deadlines({"expires_in": 300.0, "refresh_in": 225.0}, now[0]))
    now[0] += 224
    assert cache.get("acme", 0) == tok("t")
    now[0] += 2
    assert cache.get("acme", 0) is None
    # an older broker that does not say: the expiry alone decides
    cache.put(tok("u"), *client_cache.token_deadlines({"expires_in": 300.0}, now[0]))
    now[0] += 290
    assert cache.get("acme", 0) == tok("u")


def test_token_repr_hides_the_secret() -> None:
    assert "s3cret" not in repr(tok("s3cret"))
    assert tok("s3cret").header == "Bearer s3cret"


# ---------------------------------------------------------------- dc-token's command line


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["acme"], ("token", "acme", "token", None, [])),
        (["--json", "acme", "--min-ttl", "60"], ("token", "acme", "json", 60.0, [])),
        (["acme", "--header", "--socket=/s"], ("token", "acme", "header", None, [])),
        (["exec", "acme", "--", "env", "-0"], ("exec", "acme", "token", None, ["env", "-0"])),
        (["exec", "acme", "curl", "--json", "x"], ("exec", "acme", "token", None, ["curl", "--json", "x"])),
        (["exec", "--env", "T", "acme", "--", "sh"], ("exec", "acme", "token", None, ["sh"])),
        (["git-credential", "--profile", "acme", "get"], ("git", "acme", "token", None, [])),
    ],
)
def test_parse(argv: list[str], expected: tuple[object, ...]) -> None:
    args = cli.parse(argv)
    assert (args.form, args.profile, args.output, args.min_ttl, args.command) == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "missing PROFILE (see dc-token --help)"),
        (["a", "b"], "give one PROFILE"),
        (["acme", "--json", "--header"], "--header, --json and --exec-credential are alternatives: give one"),
        (["acme", "--min-ttl"], "--min-ttl needs a value"),
        (["acme", "--min-ttl", "nan"], "--min-ttl must be a number of seconds between 0 and 86400"),
        (["acme", "--json=1"], "--json takes no value"),
        (["acme", "--env", "X"], "unknown option --env (see dc-token --help)"),
        (["exec", "acme"], "exec needs a COMMAND after the profile (dc-token exec PROFILE -- COMMAND...)"),
        (["git-credential"], "git-credential needs one operation: get, store or erase"),
    ],
)
def test_usage_errors_exit_2_with_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert capsys.readouterr() == ("", f"dc-token: {message}\n")


def test_help_lists_every_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    from dc_token.errors import EXIT_CODES

    for code, text in EXIT_CODES.items():
        assert f"{code:>3}  {text}" in out
    assert "127" in out and "git-credential" in out and "ExecCredential" in out


def test_read_credential_stops_at_the_blank_line() -> None:
    lines = ["protocol=https\n", "host=dc.example.com\n", "wwwauth[]=Bearer realm=x\n", "\n", "junk=1\n"]
    assert cli.read_credential(lines) == {"protocol": "https", "host": "dc.example.com", "wwwauth[]": "Bearer realm=x"}


def test_importing_dc_token_loads_nothing_heavy() -> None:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import dc_token.cli"], capture_output=True, text=True, check=True
    ).stderr
    loaded = {line.rsplit("|", 1)[-1].strip() for line in out.splitlines()}
    assert not loaded & {"trio", "httpx", "click", "anyio", "argparse", "json", "subprocess"}


# ---------------------------------------------------------------- kubectl's ExecCredential, v1

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


def check_exec_credential_v1(doc: object) -> datetime:
    """The client.authentication.k8s.io/v1 ExecCredential rules kubectl applies; returns the expiry."""
    assert isinstance(doc, dict)
    assert set(doc) <= {"apiVersion", "kind", "spec", "status"}
    assert doc["apiVersion"] == "client.authentication.k8s.io/v1"
    assert doc["kind"] == "ExecCredential"
    assert isinstance(doc.get("spec", {}), dict)
    status = doc["status"]
    assert isinstance(status, dict)
    assert set(status) <= {"token", "expirationTimestamp", "clientCertificateData", "clientKeyData"}
    assert isinstance(status["token"], str) and status["token"]
    stamp = status["expirationTimestamp"]
    assert isinstance(stamp, str) and RFC3339_UTC.match(stamp), stamp
    return datetime.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)


def test_exec_credential_shape_and_margin() -> None:
    doc = json.loads(json.dumps(cli.exec_credential("abc", 1_800_000_000.0)))
    expiry = check_exec_credential_v1(doc)
    assert expiry.timestamp() == 1_800_000_000 - cli.EXEC_CREDENTIAL_MARGIN
    with pytest.raises(AssertionError):
        check_exec_credential_v1({**doc, "apiVersion": "client.authentication.k8s.io/v1beta1"})
    with pytest.raises(AssertionError):
        check_exec_credential_v1({**doc, "status": {"token": "abc", "expirationTimestamp": "2027-01-15 08:00:00"}})


# ---------------------------------------------------------------- BrokerAuth's flow, stepped by hand

URL = "https://dc.example.com/dp/api/v1/aiconnections/types"


def test_flow_ok_needs_one_token_and_one_request() -> None:
    flow = BrokerAuth("acme", min_ttl=45).steps(httpx.Request("GET", URL))
    assert next(flow) == GetToken(45)
    request = flow.send("t1")
    assert isinstance(request, httpx.Request) and request.headers["Authorization"] == "Bearer t1"
    with pytest.raises(StopIteration):
        flow.send(httpx.Response(200))


def test_flow_401_invalidates_and_retries_once() -> None:
    flow = BrokerAuth("acme").steps(httpx.Request("GET", URL))
    next(flow)
    flow.send("t1")
    assert flow.send(httpx.Response(401)) == Invalidate("t1")
    assert flow.send(True) == GetToken(RETRY_MIN_TTL)
    retry = flow.send("t2")
    assert isinstance(retry, httpx.Request) and retry.headers["Authorization"] == "Bearer t2"
    with pytest.raises(StopIteration):
        flow.send(httpx.Response(401))  # still 401: that is the answer, no second retry


def test_flow_401_without_a_newer_token_does_not_retry() -> None:
    flow = BrokerAuth("acme").steps(httpx.Request("GET", URL))
    next(flow)
    flow.send("t1")
    flow.send(httpx.Response(401))
    flow.send(False)
    with pytest.raises(StopIteration):
        flow.send("t1")


class FakeBroker:
    """Stands in for TokenClient and AsyncTokenClient: hands out t1, t2, ... and counts invalidates."""

    def __init__(self) -> None:
        self.current = 1
        self.invalidated: list[str] = []

    def token(self, profile: str, *, min_ttl: float = 0.0) -> str:
        return f"t{self.current}"

    def invalidate(self, profile: str, token: str) -> bool:
        self.invalidated.append(token)
        self.current += 1
        return True


class AsyncFakeBroker(FakeBroker):
    async def token(self, profile: str, *, min_ttl: float = 0.0) -> str:  # type: ignore[override]
        return FakeBroker.token(self, profile, min_ttl=min_ttl)

    async def invalidate(self, profile: str, token: str) -> bool:  # type: ignore[override]
        return FakeBroker.invalidate(self, profile, token)


def api(accept: set[str]) -> tuple[httpx.MockTransport, list[str]]:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Authorization"])
        return httpx.Response(200 if request.headers["Authorization"] in accept else 401)

    return httpx.MockTransport(handler), seen


@pytest.mark.parametrize(
    ("accept", "status", "calls"), [({"Bearer t1"}, 200, 1), ({"Bearer t2"}, 200, 2), (set(), 401, 2)]
)
def test_sync_auth_flow(accept: set[str], status: int, calls: int) -> None:
    broker = FakeBroker()
    transport, seen = api(accept)
    with httpx.Client(transport=transport, auth=BrokerAuth("acme", client=broker)) as http:  # type: ignore[arg-type]
        assert http.get(URL).status_code == status
    assert len(seen) == calls and broker.invalidated == ["t1"][: calls - 1]


@pytest.mark.parametrize("run", [trio.run, asyncio.run], ids=["trio", "asyncio"])
@pytest.mark.parametrize(
    ("accept", "status", "calls"), [({"Bearer t1"}, 200, 1), ({"Bearer t2"}, 200, 2), (set(), 401, 2)]
)
def test_async_auth_flow(run, accept: set[str], status: int, calls: int) -> None:
    broker = AsyncFakeBroker()
    transport, seen = api(accept)

    async def body() -> int:
        auth = BrokerAuth("acme", async_client=broker)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, auth=auth) as http:
            return (await http.get(URL)).status_code

    assert (run(body()) if run is asyncio.run else run(body)) == status
    assert len(seen) == calls and broker.invalidated == ["t1"][: calls - 1]


@pytest.mark.parametrize(
    "doc",
    [
        {"token": "eyJ.a-b_c", "expires_at": 1795874935, "scope": "openid email", "n": {}},
        {"scope": 'with "quotes" and \\ and é and \n', "x": None, "y": True, "z": 1.5, "s": {"t": "u"}},
    ],
)
def test_dumps_is_json_dumps(doc: dict[str, object]) -> None:
    assert cli.dumps(doc) == json.dumps(doc)


# ---------------------------------------------------------------- TokenClient's timeout


@pytest.fixture
def silent_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A socket that accepts and reads, and never answers."""
    path = str(tmp_path_factory.mktemp("silent") / "b.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(8)
    held: list[socket.socket] = []
    accept_in_thread(listener, held.append)
    try:
        yield path
    finally:
        listener.close()
        for conn in held:
            conn.close()


def test_a_broker_that_does_not_answer_is_a_timeout_after_timeout(silent_broker: str) -> None:
    """The timeout is the kernel's on a blocking socket (``sync.connect``): no poll before every
    send and receive, and the same errors as Python's own timeout."""
    client = TokenClient(silent_broker, timeout=0.3, cache=False)
    raised: list[BaseException] = []

    def within(call: Callable[[], object]) -> float:
        """Seconds ``call`` took to raise (run in a thread: a timeout that never comes fails, not hangs)."""
        raised.clear()
        t0 = time.monotonic()

        def run() -> None:
            try:
                call()
            except BaseException as exc:  # handed to the test
                raised.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(10)
        assert not thread.is_alive(), "no timeout: the request waited on"
        return time.monotonic() - t0

    assert 0.25 < within(lambda: client.token("acme")) < 3
    assert isinstance(raised[0], BrokerTimeout) and "did not answer within 0.3 s" in str(raised[0])
    sock = sync.connect(silent_broker, 0.3)
    assert sock.gettimeout() is None  # blocking: the kernel keeps the time
    sock.close()
    assert 0.25 < within(lambda: next(client.stream("login", profile="acme"))) < 3
    assert isinstance(raised[0], TimeoutError)  # a stream's wait for its next reply, as before
    client.close()
