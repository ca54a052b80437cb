"""What the people who run the host see (issue 25): the metrics, parsed with Prometheus' own text
parser and checked against a broker driven through known events; the HTTP endpoint with a real HTTP
client; the audit trail's events in JSON lines, each matched by name and fields, with no planted
secret in any of them; status paging for hundreds of profiles.

Real processes: the dev IdP (rotating refresh tokens, short-lived access tokens) and `dc-broker run`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from dc_broker.config.values import DaemonSettings, metrics_address
from dc_broker.errors import AnswerLost, ConfigError, IdpMisconfigured, MaybeLocked, UpstreamTransient
from dc_broker.observe.counters import Counts, Latency, failure_reason
from dc_broker.observe.events import EVENTS, RefusalLog
from dc_token.errors import BadRequest, CredentialsRejected, Locked, LoginRequired
from dc_token.sync import TokenClient
from tests.e2e import DC_BROKER, dc_token, dev_idp, start_run, stop, wait_for

pytestmark = pytest.mark.e2e

#: planted in the secrets the broker holds, then looked for in everything it wrote
SENTINEL_PASSWORD = "pw-SENTINEL-7d1c"
SENTINEL_SECRET = "dc-cli-secret"  # the dev IdP's client secret for dc-cli: it must be this value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def families(text: str) -> dict[str, Any]:
    """The exposition parsed by prometheus_client's own parser: name -> family."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Any], name: str, **labels: str) -> float:
    """The one sample of family ``name`` (its sample name with ``_total`` etc. as parsed) with these labels."""
    fam = fams[name]
    found = [
        s.value
        for s in fam.samples
        if all(s.labels.get(k) == v for k, v in labels.items()) and s.name in (name, f"{name}_total")
    ]
    assert len(found) == 1, (name, labels, fam.samples)
    return float(found[0])


# ---------------------------------------------------------------- units


def test_failure_reasons_are_a_closed_set_by_what_the_outcome_means() -> None:
    assert failure_reason(Locked("x")) is None
    assert failure_reason(MaybeLocked("x")) == "maybe_locked"
    assert failure_reason(IdpMisconfigured("x")) == "misconfigured"
    assert failure_reason(LoginRequired("x")) == "login_required"
    assert failure_reason(CredentialsRejected("x")) == "credential_wrong"
    assert failure_reason(ConfigError("x")) == "credential_wrong"
    assert failure_reason(AnswerLost("x")) == "answer_lost"
    assert failure_reason(UpstreamTransient("x")) == "unreachable"


def test_the_latency_histogram_is_cumulative_with_inf_last() -> None:
    hist = Latency()
    for seconds in (0.001, 0.005, 0.3, 100.0):
        hist.observe(seconds)
    buckets = dict(hist.cumulative())
    assert buckets["0.005"] == 2 and buckets["0.25"] == 2 and buckets["0.5"] == 3 and buckets["+Inf"] == 4
    assert hist.count == 4 and hist.total == pytest.approx(100.306)


def test_counts_only_go_up() -> None:
    counts = Counts()
    counts.answered("token")
    counts.answered("token")
    counts.failed_request("token", "forbidden")
    counts.refusal("not_allowed")
    assert counts.ok == {"token": 2} and counts.errors == {("token", "forbidden"): 1}
    assert counts.refused["not_allowed"] == 1 and counts.refused["foreign_uid"] == 0


@pytest.mark.parametrize(
    ("text", "allow", "problem"),
    [
        ("127.0.0.1:9464", False, None),
        ("[::1]:9464", False, None),
        ("localhost:9464", False, None),
        ("unix:/run/dc-broker/metrics.sock", False, None),
        ("0.0.0.0:9464", False, "is not a loopback address"),
        ("192.0.2.7:9464", False, "is not a loopback address"),
        ("192.0.2.7:9464", True, None),
        ("metrics.example:9464", True, "is not an IP address"),
        ("127.0.0.1", False, 'use "127.0.0.1:9464"'),
        ("unix:relative", False, "absolute path"),
    ],
)
def test_metrics_listen_is_loopback_unless_the_config_says_otherwise(
    text: str, allow: bool, problem: str | None
) -> None:
    if problem is None:
        metrics_address(text, allow_remote=allow)
        DaemonSettings(metrics_listen=text, metrics_allow_remote=allow)
    else:
        with pytest.raises(ConfigError, match=problem):
            DaemonSettings(metrics_listen=text, metrics_allow_remote=allow)


def test_refusal_lines_are_one_per_uid_per_period() -> None:
    from dc_broker.access.caller import Caller

    now = [0.0]
    log = RefusalLog(lambda: now[0], every=10.0)
    caller = Caller(1002, 1002, 4242)
    assert log.refused(caller, "token", "acme", "not_allowed", "forbidden", "no")
    assert not log.refused(caller, "token", "acme", "not_allowed", "forbidden", "no")
    assert log.refused(Caller(1003, 1003, 1), "token", "acme", "not_allowed", "forbidden", "no")  # its own uid
    now[0] = 10.5
    assert log.refused(caller, "token", "acme", "not_allowed", "forbidden", "no")
    assert "caller_refused" in EVENTS


# ---------------------------------------------------------------- a broker driven through known events


def _config(tmp: Path, idp: str, dead: str, daemon: str = "") -> Path:
    cfg = tmp / "config.toml"
    cfg.write_text(
        f"""[daemon]
audit_interval = 1
log_format = "json"
{daemon}

[profiles.good]
server = "{idp}"
tenant = "demo"
client_id = "dc-cli"
username = "demo"
scope = "openid profile"

[profiles.wrong]
server = "{idp}"
tenant = "demo"
client_id = "dc-cli"
username = "demo"

[profiles.down]
server = "{dead}"
tenant = "demo"
client_id = "dc-cli"
username = "demo"

[profiles.closed]
server = "{idp}"
tenant = "demo"
client_id = "dc-cli"
username = "demo"
allow = ["uid:54321"]
"""
    )
    return cfg


SECRETS = f"""[good]
password = "demo"
client_secret = "{SENTINEL_SECRET}"
[wrong]
password = "{SENTINEL_PASSWORD}"
client_secret = "{SENTINEL_SECRET}"
[down]
password = "demo"
client_secret = "{SENTINEL_SECRET}"
[closed]
password = "demo"
client_secret = "{SENTINEL_SECRET}"
"""


@contextmanager
def driven_broker(tmp: Path, daemon: str = "") -> Iterator[tuple[str, subprocess.Popen[str], dict[str, Any]]]:
    """A broker against a rotating dev IdP whose access tokens live 3 s, driven through known events:
    two tokens served to us, one refusal (a profile whose allow rules name another uid), a wrong
    password (rejected), an IdP that is down, and refreshes that rotate the refresh token."""
    dead = f"http://127.0.0.1:{free_port()}"
    with dev_idp("--rotate", "--access-lifespan", "3") as idp:
        cfg = _config(tmp, idp, dead, daemon)
        sock = str(tmp / "run" / "broker.sock")
        proc = start_run(cfg, sock, SECRETS)
        try:
            seen: dict[str, Any] = {"tokens": []}
            for _ in range(2):
                got = dc_token(sock, "good")
                assert got.returncode == 0, got.stderr
                seen["tokens"].append(got.stdout.strip())
            refused = dc_token(sock, "closed")
            assert refused.returncode == 9, refused.stderr  # forbidden
            wrong = dc_token(sock, "wrong")
            assert wrong.returncode == 8, wrong.stderr  # credentials_rejected
            with TokenClient(sock, cache=False) as broker:
                wait_for(
                    lambda: _metric(broker, "dc_broker_refresh_token_rotations", profile="good") >= 1, 30, "a rotation"
                )
                wait_for(
                    lambda: _metric(broker, "dc_broker_refresh_failures", profile="down", reason="unreachable") >= 1,
                    30,
                    "a failed refresh of the profile whose IdP is down",
                )
            yield sock, proc, seen
        finally:
            stop(proc)


def _metric(broker: TokenClient, name: str, **labels: str) -> float:
    fams = families(broker.request("metrics")["text"])
    try:
        return value(fams, name, **labels)
    except AssertionError:
        return 0.0


def test_metrics_follow_known_events_and_the_http_endpoint_serves_them(tmp_path: Path) -> None:
    port = free_port()
    with driven_broker(tmp_path, f'metrics_listen = "127.0.0.1:{port}"') as (sock, _proc, seen):
        out = subprocess.run([DC_BROKER, "metrics", "--socket", sock], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        fams = families(out.stdout)
        # per profile
        assert 0 < value(fams, "dc_broker_token_expires_in_seconds", profile="good") <= 3
        assert value(fams, "dc_broker_login_ends_in_seconds", profile="good") > 0
        assert value(fams, "dc_broker_profile_state", profile="good", state="fresh") == 1
        assert value(fams, "dc_broker_profile_state", profile="good", state="stale") == 0
        assert value(fams, "dc_broker_profile_state", profile="wrong", state="rejected") == 1
        assert value(fams, "dc_broker_profile_state", profile="down", state="unavailable") == 1
        assert value(fams, "dc_broker_refresh_failures", profile="wrong", reason="credential_wrong") == 1
        assert value(fams, "dc_broker_refresh_failures", profile="down", reason="unreachable") >= 1
        rotations = value(fams, "dc_broker_refresh_token_rotations", profile="good")
        attempts = value(fams, "dc_broker_refresh_attempts", profile="good")
        # the login, then every refresh rotated; an attempt counts when it starts, so one may be at
        # the IdP as the metrics are read (tokens live 3 s here): its rotation is still to come
        assert rotations >= 1 and attempts - rotations in (1, 2), (attempts, rotations)
        assert value(fams, "dc_broker_relogins", profile="good", grant="password") == 1  # the first login only
        assert value(fams, "dc_broker_relogins", profile="wrong", grant="password") == 1
        latency = {
            s.labels.get("le"): s.value
            for s in fams["dc_broker_idp_request_duration_seconds"].samples
            if s.labels.get("profile") == "good" and s.name.endswith("_bucket")
        }
        count = [
            s.value
            for s in fams["dc_broker_idp_request_duration_seconds"].samples
            if s.labels.get("profile") == "good" and s.name.endswith("_count")
        ]
        assert latency["+Inf"] == count[0] >= attempts  # discovery aside, one request per attempt
        # per broker
        assert value(fams, "dc_broker_requests", op="token", result="ok") == 2
        assert value(fams, "dc_broker_requests", op="token", result="forbidden") == 1
        assert value(fams, "dc_broker_requests", op="token", result="credentials_rejected") == 1
        assert value(fams, "dc_broker_refused_callers", reason="not_allowed") == 1
        assert value(fams, "dc_broker_refused_callers", reason="foreign_uid") == 0
        assert value(fams, "dc_broker_connections_open") >= 1  # the metrics request's own
        assert value(fams, "dc_broker_vault_locked") == 0
        assert value(fams, "dc_broker_profiles") == 4
        info = fams["dc_broker_build_info"].samples[0]
        assert info.value == 1 and info.labels["mode"] == "user" and info.labels["version"]
        # root (the owner) sees every profile, also one whose allow rules name only another uid: its
        # state is one of the states (fresh, or stale while its 3 s token is being refreshed under load)
        closed = [s for s in fams["dc_broker_profile_state"].samples if s.labels.get("profile") == "closed"]
        assert closed and sum(s.value for s in closed) == 1, closed

        # the HTTP endpoint: a real HTTP client, GET only, the same families, no token on it
        url = f"http://127.0.0.1:{port}/metrics"
        resp = httpx.get(url, timeout=10)
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain; version=0.0.4")
        http_fams = families(resp.text)
        assert set(http_fams) == set(fams)
        assert value(http_fams, "dc_broker_requests", op="token", result="ok") == 2
        assert httpx.post(url, content=b"x", timeout=10).status_code == 405
        assert httpx.head(url, timeout=10).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/tokens", timeout=10).status_code == 404
        for token in seen["tokens"]:
            assert token not in resp.text and token not in out.stdout
        for secret in (SENTINEL_PASSWORD, SENTINEL_SECRET):
            assert secret not in resp.text and secret not in out.stdout


def test_the_metrics_endpoint_on_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "metrics.sock"
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[daemon]\nmetrics_listen = "unix:{path}"\n')
    sock = str(tmp_path / "run" / "broker.sock")
    proc = start_run(cfg, sock, "")
    try:
        wait_for(path.exists, 20, "the metrics socket")
        assert oct(path.stat().st_mode & 0o777) == "0o660"
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(path))) as client:
            resp = client.get("http://metrics/metrics", timeout=10)
        assert resp.status_code == 200
        assert value(families(resp.text), "dc_broker_profiles") == 0
    finally:
        assert stop(proc) == 0


def test_a_non_loopback_metrics_listen_is_refused_at_start(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('[daemon]\nmetrics_listen = "0.0.0.0:9464"\n')
    sock = str(tmp_path / "run" / "broker.sock")
    proc = start_run(cfg, sock, "", wait=False)
    assert proc.wait(30) == 2  # a config error, before anything listens
    err = proc.stderr.read() if proc.stderr else ""
    assert "daemon.metrics_listen = '0.0.0.0:9464' is not a loopback address" in err
    assert "daemon.metrics_allow_remote = true" in err
    assert not os.path.exists(sock)


# ---------------------------------------------------------------- the audit trail


def _records(stderr: str) -> list[dict[str, Any]]:
    """Every line is one JSON object (log_format = "json"); fails on any line that is not."""
    return [json.loads(line) for line in stderr.splitlines() if line.strip()]


def test_every_audit_event_in_json_lines_with_its_fields_and_no_secret(tmp_path: Path) -> None:
    from dc_broker.cli.talk import ask

    with driven_broker(tmp_path) as (sock, proc, seen):
        ask(sock, "reload")
        ask(sock, "set_secrets", profile="wrong", password="demo")  # the right password: out of rejected
        wait_for(lambda: dc_token(sock, "wrong").returncode == 0, 30, "profile wrong serving with its new password")
        ask(sock, "logout", profile="wrong")
        with pytest.raises(BadRequest, match="nothing to lock"):
            ask(sock, "lock")  # no vault: refused with bad_request, and audited as such
        with TokenClient(sock, cache=False) as broker:
            broker.request("token", profile="good")
        # a person's login (the password typed again) is an admin change too
        login = subprocess.run(
            [DC_BROKER, "login", "good", "--socket", sock, "--password-stdin"],
            input="demo\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert login.returncode == 0, login.stderr
        # a reload that changes something, by signal: what it added, changed and removed is audited
        cfg = tmp_path / "config.toml"
        text = cfg.read_text().replace(
            'username = "demo"\n\n[profiles.down]', 'username = "demo"\nscope = "openid"\n\n[profiles.down]'
        )
        cfg.write_text(
            text
            + '\n[profiles.extra]\ntoken_url = "https://x.example/t"\nclient_id = "x"\ngrant = "client_credentials"\n'
        )
        proc.send_signal(signal.SIGHUP)
        with TokenClient(sock, cache=False) as broker:
            wait_for(
                lambda: "extra" in {p["profile"] for p in broker.status_all()["profiles"]}, 30, "the reload by SIGHUP"
            )
        trio.run(trio.sleep, 1.5)  # one audit interval: token_served is written
    stderr = proc.stderr.read() if proc.stderr else ""
    records = _records(stderr)
    events: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        if "event" in rec:
            assert rec["logger"] == "dc_broker.audit" and rec["event"] in EVENTS
            events.setdefault(rec["event"], []).append(rec)
    me = os.getuid()
    served = [e for e in events["token_served"] if e["profile"] == "good"]
    assert sum(e["count"] for e in served) == 3 and all(e["caller_uid"] == me for e in served)
    refused = events["caller_refused"]
    assert refused[0]["profile"] == "closed" and refused[0]["reason"] == "not_allowed"
    assert refused[0]["error_code"] == "forbidden" and refused[0]["caller_uid"] == me and refused[0]["op"] == "token"
    changes = {(e["op"], e.get("profile"), e["result"]) for e in events["admin_change"]}
    assert ("reload", None, "ok") in changes
    assert ("set_secrets", "wrong", "ok") in changes
    assert ("logout", "wrong", "ok") in changes
    assert ("login", "good", "ok") in changes
    assert ("lock", None, "error") in changes
    secrets_change = next(e for e in events["admin_change"] if e["op"] == "set_secrets")
    assert secrets_change["fields"] == "password" and secrets_change["caller_uid"] == me
    assert next(e for e in events["admin_change"] if e["op"] == "lock")["error_code"] == "bad_request"
    relogins = {(e["profile"], e["grant"]) for e in events["relogin"]}
    assert ("good", "password") in relogins and ("wrong", "password") in relogins
    rotated = [e for e in events["refresh_token_rotated"] if e["profile"] == "good"]
    assert rotated and all(isinstance(e["generation"], int) for e in rotated)
    assert events["reload"][0]["source"] == "op" and events["reload"][0]["changed"] == ""
    by_signal = [e for e in events["reload"] if e["source"] == "SIGHUP"]
    assert [(e["added"], e["changed"], e["removed"]) for e in by_signal] == [("extra", "wrong", "")]
    # the sessions' own lines name their profile too
    assert any(r.get("profile") == "down" and "refresh failed" in r["message"] for r in records)
    # no secret and no token anywhere in the log
    for secret in (SENTINEL_PASSWORD, SENTINEL_SECRET, *seen["tokens"]):
        assert secret not in stderr


def test_lock_and_unlock_are_audited_with_who(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DC_BROKER_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), XDG_DATA_HOME=str(tmp_path / "data"))
    sock = str(tmp_path / "run" / "broker.sock")
    env["DC_BROKER_SOCKET"] = sock
    assert (
        subprocess.run(
            [DC_BROKER, "init", "--passphrase-stdin"],
            input="correct horse\n",
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        ).returncode
        == 0
    )
    cfg = tmp_path / "config" / "dc-broker" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text('[daemon]\nlog_format = "json"\n')
    proc = subprocess.Popen([DC_BROKER, "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: os.path.exists(sock), 20, "the broker's socket")
        for args in (["unlock", "--passphrase-stdin"], ["lock"]):
            done = subprocess.run(
                [DC_BROKER, *args], input="correct horse\n", env=env, capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 0, done.stderr
    finally:
        assert stop(proc) == 0
    stderr = proc.stderr.read() if proc.stderr else ""
    records = [r for r in _records(stderr) if r.get("event") in ("vault_locked", "vault_unlocked")]
    assert [(r["event"], r["by"], r["caller_uid"]) for r in records] == [
        ("vault_unlocked", "caller", os.getuid()),
        ("vault_locked", "caller", os.getuid()),
    ]
    assert "correct horse" not in stderr


# ---------------------------------------------------------------- status for hundreds of profiles


def test_status_pages_are_followed_by_the_cli_and_the_clients(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        "".join(
            f'[profiles.p{i:03d}]\nserver = "http://127.0.0.1:9"\ntenant = "t"\nclient_id = "c"\ngrant = "device"\n'
            for i in range(300)
        )
    )
    sock = str(tmp_path / "run" / "broker.sock")
    proc = start_run(cfg, sock, "")
    try:
        with TokenClient(sock, cache=False) as broker:
            first = broker.status()
            assert first["broker"]["truncated"] > 0 and first["broker"]["next"]  # one reply is one frame
            everything = broker.status_all()
            cut = broker.status_all(limit=250)
        assert [p["profile"] for p in everything["profiles"]] == [f"p{i:03d}" for i in range(300)]
        assert everything["broker"]["truncated"] == 0 and everything["broker"]["next"] is None
        assert len(cut["profiles"]) == 250 and cut["broker"]["truncated"] == 50 and cut["broker"]["next"] == "p249"

        async def in_async() -> dict[str, Any]:
            from dc_token.aio import AsyncTokenClient

            async with AsyncTokenClient(sock, cache=False) as client:
                return await client.status_all()

        assert [p["profile"] for p in trio.run(in_async)["profiles"]] == [f"p{i:03d}" for i in range(300)]
        shown = subprocess.run(
            [DC_BROKER, "status", "--json", "--socket", sock], capture_output=True, text=True, timeout=60
        )
        doc = json.loads(shown.stdout)
        assert len(doc["profiles"]) == 300 and doc["broker"]["truncated"] == 0
        limited = subprocess.run(
            [DC_BROKER, "status", "--limit", "10", "--socket", sock], capture_output=True, text=True, timeout=60
        )
        lines = limited.stdout.splitlines()
        assert lines[2].startswith("p000") and lines[11].startswith("p009") and lines[12].startswith("... and 290 more")
    finally:
        assert stop(proc) == 0
