"""End to end: `dc-broker dev` / `dc-broker run` as real processes, dc-token and raw clients on real sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import subprocess
from pathlib import Path

import httpx
import msgpack
import pytest

from dc_token.errors import BadRequest, BrokerUnavailable, UnknownProfile
from dc_token.protocol import Request, encode
from dc_token.sync import TokenClient
from tests.e2e import (
    DC_BROKER,
    approve_device,
    connections_on,
    dc_token,
    dev_broker,
    dev_idp,
    device_code,
    run,
    start_run,
    stop,
    wait_for,
)

pytestmark = pytest.mark.e2e

API = "/dp/api/v1/aiconnections/types"


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory):
    with dev_broker(tmp_path_factory.mktemp("dev")) as env:
        yield env


def test_dc_token_gets_a_token_the_demo_api_accepts(dev) -> None:
    sock, base, _ = dev
    result = dc_token(sock, "demo")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert result.stdout == token + "\n" and result.stderr == ""
    assert httpx.get(base + API, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert httpx.get(base + API).status_code == 401
    assert httpx.get(base + API, headers={"Authorization": "Bearer not-a-token"}).status_code == 401


def test_client_credentials_profile(dev) -> None:
    sock, base, _ = dev
    token = TokenClient(sock).token("demo-service", min_ttl=60)
    assert httpx.get(base + API, headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_cached_token_is_reused(dev) -> None:
    sock, _, _ = dev
    with TokenClient(sock) as c:
        assert c.token("demo") == c.token("demo", min_ttl=60)
        status = c.status("demo")["profiles"][0]
    assert status["state"] == "fresh" and status["expires_in"] > 1700


def test_socket_and_directory_are_private(dev) -> None:
    sock, _, _ = dev
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(sock)).st_mode) == 0o700


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["nope"], 4, "dc-token: no profile named 'nope'; `dc-broker status` lists the profiles"),
        (["demo", "--min-ttl", "-1"], 2, "dc-token: --min-ttl must be a number of seconds between 0 and 86400"),
    ],
)
def test_dc_token_failures_are_one_line_with_exit_codes(dev, args: list[str], code: int, message: str) -> None:
    sock, _, _ = dev
    result = dc_token(sock, *args)
    assert (result.returncode, result.stdout, result.stderr) == (code, "", message + "\n")


def test_dc_token_without_a_broker(tmp_path: Path) -> None:
    result = dc_token(str(tmp_path / "none.sock"), "demo")
    assert result.returncode == 3
    assert result.stderr == (
        f"dc-token: no dc-broker is running on {tmp_path / 'none.sock'}; "
        "start it with `systemctl --user start dc-broker` or `dc-broker run`\n"
    )
    with pytest.raises(BrokerUnavailable):
        TokenClient(str(tmp_path / "none.sock")).hello()


def test_pipelined_requests_on_one_connection(dev) -> None:
    sock, _, _ = dev
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.sendall(
        b"".join(encode(Request(i, "token", {"profile": "demo"})) for i in range(1, 4)) + encode(Request(9, "hello"))
    )
    replies = read_frames(s, 4)
    assert sorted(r["id"] for r in replies) == [1, 2, 3, 9]
    assert all(r["ok"] for r in replies)
    s.close()


def read_frames(s: socket.socket, n: int) -> list[dict]:
    buf = b""
    out = []
    s.settimeout(10)
    while len(out) < n:
        while len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">I", buf[:4])[0]:
            size = struct.unpack(">I", buf[:4])[0]
            out.append(msgpack.unpackb(buf[4 : 4 + size]))
            buf = buf[4 + size :]
        if len(out) >= n:
            break
        data = s.recv(65536)
        if not data:
            break
        buf += data
    return out


@pytest.mark.parametrize(
    "garbage",
    [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", struct.pack(">I", 3) + b"\xc1\xc1\xc1", struct.pack(">I", 2) + b"\x92\x01"],
    ids=["http", "not-msgpack", "array"],
)
def test_garbage_closes_that_connection_only(dev, garbage: bytes) -> None:
    sock, _, _ = dev
    bad = socket.socket(socket.AF_UNIX)
    bad.connect(sock)
    bad.sendall(garbage)
    [reply] = read_frames(bad, 1)
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request"
    assert bad.recv(10) == b""  # closed
    bad.close()
    assert TokenClient(sock).token("demo")


def test_the_broker_refuses_bad_op_arguments_as_the_client_does(dev) -> None:
    """Every op's arguments are checked by the one table (dc_token.protocol.ARGS) on both sides: the
    broker's error reply carries the very message the client raises before sending."""
    from dc_token.protocol import OpArgs
    from tests.test_connection import BAD_OP_ARGS

    sock, _, _ = dev
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.sendall(b"".join(encode(Request(i, op, args)) for i, (op, args, _) in enumerate(BAD_OP_ARGS, 1)))
    replies = {r["id"]: r for r in read_frames(s, len(BAD_OP_ARGS))}
    s.close()
    for i, (op, args, message) in enumerate(BAD_OP_ARGS, 1):
        with pytest.raises(BadRequest) as raised:
            OpArgs(op, **args)
        assert replies[i]["error"] == {"code": "bad_request", "message": str(raised.value)}, (op, args)
        assert message in replies[i]["error"]["message"]


def test_misshapen_request_keeps_the_connection(dev) -> None:
    sock, _, _ = dev
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    body = msgpack.packb({"v": 1, "id": 5, "op": "token", "profile": 7})
    s.sendall(struct.pack(">I", len(body)) + body + encode(Request(6, "frobnicate")) + encode(Request(7, "hello")))
    replies = {r["id"]: r for r in read_frames(s, 3)}
    assert replies[5]["error"]["code"] == "bad_request"
    assert replies[6]["error"]["code"] == "unknown_op"
    assert replies[7]["ok"] is True
    s.close()


def test_a_stalled_client_does_not_delay_others(dev) -> None:
    sock, _, _ = dev
    stalled = []
    for _ in range(50):
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock)
        s.sendall(encode(Request(1, "token", {"profile": "demo"}))[:5])  # half a frame, then silence
        stalled.append(s)
    with TokenClient(sock, timeout=5) as c:
        for _ in range(100):
            assert c.token("demo")
    for s in stalled:
        s.close()


def test_unknown_profile_error_class(dev) -> None:
    sock, _, _ = dev
    with pytest.raises(UnknownProfile, match="nope"):
        TokenClient(sock).token("nope")


def test_second_daemon_on_the_same_socket_is_refused(dev, tmp_path: Path) -> None:
    sock, _, _ = dev
    env = {k: v for k, v in os.environ.items() if k != "DC_BROKER_CONFIG"}
    result = run([DC_BROKER, "run", "--socket", sock], env={**env, "XDG_CONFIG_HOME": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.startswith(f"Error: a dc-broker already runs on {sock} (pid ")  # said before the vault
    assert "send the change to it" not in result.stderr
    assert "Traceback" not in result.stderr
    assert TokenClient(sock).hello()["server"] == "dc-broker"


def write_config(tmp: Path, base: str) -> Path:
    cfg = tmp / "config.toml"
    cfg.write_text(
        f"""
[profiles.acme]
server = "{base}"
tenant = "demo"
client_id = "dc-cli"
username = "demo"

[profiles.svc]
server = "{base}"
tenant = "demo"
client_id = "dc-service"
grant = "client_credentials"
auth_method = "post"

[profiles.nosecret]
server = "{base}"
tenant = "demo"
client_id = "dc-service"
grant = "client_credentials"
"""
    )
    return cfg


def test_run_with_config_and_secrets_on_stdin(dev, tmp_path: Path) -> None:
    _, base, _ = dev
    cfg = write_config(tmp_path, base)
    sock = str(tmp_path / "r" / "b.sock")
    proc = start_run(
        cfg,
        sock,
        '[acme]\npassword = "demo"\nclient_secret = "dc-cli-secret"\n[svc]\nclient_secret = "dc-service-secret"\n',
    )
    try:
        assert dc_token(sock, "acme").returncode == 0
        assert dc_token(sock, "svc").returncode == 0
        result = dc_token(sock, "nosecret")
        assert result.returncode == 5
        assert (
            "no client secret stored" in result.stderr
            and "`dc-broker rotate nosecret --client-secret`" in result.stderr
        )
        status = run([DC_BROKER, "status", "--socket", sock])
        assert status.returncode == 0 and "acme" in status.stdout and "fresh" in status.stdout
    finally:
        assert stop(proc, signal.SIGTERM) == 0
    assert not os.path.exists(sock)
    err = proc.stderr.read() if proc.stderr else ""
    for secret in ("dc-cli-secret", "dc-service-secret", '"demo"'):
        assert secret not in err


def test_stale_socket_is_replaced(dev, tmp_path: Path) -> None:
    _, base, _ = dev
    sock = str(tmp_path / "s" / "b.sock")
    os.makedirs(os.path.dirname(sock), mode=0o700)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock)
    stale.close()  # the file stays, nobody listens: what a kill -9 leaves behind
    proc = start_run(write_config(tmp_path, base), sock, "")
    try:
        assert TokenClient(sock).hello()["server"] == "dc-broker"
    finally:
        assert stop(proc) == 0


def test_broken_config_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        '[profiles.acme]\nserver = "https://sso.example.com"\ntenant = "acme"\nclient_id = "c"\nusername = "u"\ncolour = "blue"\n'
    )
    result = run([DC_BROKER, "run", "--config", str(cfg), "--socket", str(tmp_path / "b.sock")])
    assert result.returncode == 2
    assert f"Error: {cfg}:6: unknown key profiles.acme.colour" in result.stderr
    assert "Traceback" not in result.stderr
    missing = run([DC_BROKER, "run", "--config", str(tmp_path / "missing.toml"), "--socket", str(tmp_path / "b.sock")])
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_dev_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    with dev_broker(tmp_path) as (sock, _, proc):
        assert TokenClient(sock).token("demo")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    assert not os.path.exists(sock)


def test_broker_survives_clients_vanishing_mid_request(dev) -> None:
    sock, _, _ = dev
    before = connections_on(sock)  # earlier tests' connections may still be open
    for _ in range(20):
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock)
        s.sendall(encode(Request(1, "token", {"profile": "demo", "min_ttl": 86400})))
        s.close()
    wait_for(lambda: connections_on(sock) <= before, 20, "the broker to be done with the 20 vanished clients")
    assert TokenClient(sock).token("demo")


def test_watch_streams_each_new_token(dev) -> None:
    sock, _, _ = dev
    w = socket.socket(socket.AF_UNIX)
    w.connect(sock)
    w.sendall(encode(Request(42, "watch", {"profile": "demo"})))
    [first] = read_frames(w, 1)
    assert first["id"] == 42 and first["more"] is True and first["result"]["token"]
    # the API said 401 to that token: the broker refreshes, and the watcher hears about it
    with TokenClient(sock) as c:
        assert c.invalidate("demo", first["result"]["token"])
    [second] = read_frames(w, 1)
    assert second["id"] == 42 and second["more"] is True
    assert second["result"]["token"] != first["result"]["token"]
    w.close()
    assert TokenClient(sock).token("demo") == second["result"]["token"]


def test_scope_argument_on_the_wire(dev) -> None:
    """A per-request scope, as Keycloak answers it: narrowed; never wider than asked (Keycloak keeps its
    default scopes profile and email in every token, so asking for less is refused naming them); and a
    scope the login never had dropped silently by the IdP, the granted scope in the result for the
    caller to judge (dc-token --scope fails on it)."""
    sock, _, _ = dev
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.sendall(
        encode(Request(1, "token", {"profile": "demo", "scope": "profile email"}))
        + encode(Request(2, "token", {"profile": "demo", "scope": 'bad"scope'}))
        + encode(Request(3, "token", {"profile": "demo", "scope": "email"}))
        + encode(Request(4, "token", {"profile": "demo", "scope": "openid profile email"}))
    )
    replies = {r["id"]: r for r in read_frames(s, 4)}
    assert replies[1]["ok"] and set(replies[1]["result"]["scope"].split()) == {"profile", "email"}
    assert replies[2]["error"]["code"] == "bad_request"
    assert replies[3]["error"]["code"] == "credentials_rejected"  # the IdP adds its default scopes
    assert "more than asked (profile)" in replies[3]["error"]["message"]
    # the demo profile sets no scope: its login has the IdP's defaults (profile email), and a
    # per-request scope may only narrow those; the broker refuses before asking the IdP
    assert replies[4]["error"]["code"] == "bad_request"
    assert "asks for more than what its login was granted, 'profile email'" in replies[4]["error"]["message"]
    assert replies[4]["error"]["message"].split(": ")[-1].startswith("openid;")
    s.close()


def test_login_with_password(dev) -> None:
    sock, _, _ = dev
    good = run([DC_BROKER, "login", "--socket", sock, "--password-stdin", "demo"], input="demo\n")
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith("Logged in: profile demo has a token for")
    bad = run([DC_BROKER, "login", "--socket", sock, "--password-stdin", "demo"], input="wrong\n")
    assert bad.returncode == 8
    assert "Invalid user credentials" in bad.stderr and "wrong" not in bad.stderr
    assert "HTTP 401" in bad.stderr
    # a wrong password is checked before anything is replaced: the working login stays
    assert dc_token(sock, "demo").returncode == 0
    st = json.loads(run([DC_BROKER, "status", "--socket", sock, "--json"]).stdout)
    assert {p["profile"]: p["state"] for p in st["profiles"]}["demo"] == "fresh"
    fixed = run([DC_BROKER, "login", "--socket", sock, "--password-stdin", "demo"], input="demo\n")
    assert fixed.returncode == 0 and dc_token(sock, "demo").returncode == 0


DEVICE_PROFILE = """[profiles.demo-device]
server = "{base}"
tenant = "demo"
client_id = "dc-public"
grant = "device"
auth_method = "none"
"""


def test_device_login_through_the_verification_page(tmp_path: Path) -> None:
    # the demo-device profile of `dc-broker dev`, on a broker of its own against a realm that asks for
    # a poll every second (the least the broker accepts) instead of Keycloak's 5 s
    with dev_idp("--device-interval", "1") as base:
        cfg = tmp_path / "config.toml"
        cfg.write_text(DEVICE_PROFILE.format(base=base))
        sock = str(tmp_path / "run" / "b.sock")
        broker = start_run(cfg, sock, "")
        try:
            assert dc_token(sock, "demo-device").returncode == 5  # login required
            proc = subprocess.Popen(
                [DC_BROKER, "login", "--socket", sock, "demo-device"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            approve_device(base, device_code(proc))
            out, err = proc.communicate(timeout=20)
            assert proc.returncode == 0, err
            assert "Logged in: profile demo-device" in out
            token = dc_token(sock, "demo-device")
            assert token.returncode == 0
            assert httpx.get(base + API, headers={"Authorization": f"Bearer {token.stdout.strip()}"}).status_code == 200
        finally:
            assert stop(broker) == 0
