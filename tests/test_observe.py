"""What the people who run the host see (issue 25): the metrics, parsed with Prometheus' own text
parser and checked against a broker driven through known events; the HTTP endpoint with a real HTTP
client; the audit trail's events in JSON lines, each matched by name and fields, with no planted
secret in any of them; status paging for hundreds of profiles.

Real processes: the dev IdP (rotating refresh tokens, short-lived access tokens) and `dc-broker run`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
from tests.e2e import DC_BROKER, dc_token, dev_idp, start_run, stop, wait_for, wait_for_socket

pytestmark = pytest.mark.e2e

#: planted in the secrets the broker holds, then looked for in everything it wrote
SENTINEL_PASSWORD = "pw-SENTINEL-7d1c"
SENTINEL_SET = "pw-SENTINEL-set-4b2e"  # sent later with set_secrets: no user's password
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


class Recorder:
    """A reverse proxy in front of the dev IdP that keeps every token the IdP answered with (access,
    refresh and ID tokens, rotated ones too): what the broker holds and never shows, to grep for.
    The Host header goes through as sent, so the IdP's issuer is the recorder's URL."""

    def __init__(self, upstream: str) -> None:
        #: what the IdP issued, by kind: access_token, refresh_token, id_token (``issued()`` reads it)
        self._issued: dict[str, set[str]] = {"access_token": set(), "refresh_token": set(), "id_token": set()}
        self._lock = threading.Lock()
        client = httpx.Client(timeout=30)
        recorder = self

        class Forward(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                skip = {"connection", "content-length", "transfer-encoding", "accept-encoding", "keep-alive"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                resp = client.request(self.command, upstream + self.path, content=body, headers=headers)
                with contextlib.suppress(ValueError), recorder._lock:
                    doc = resp.json()
                    for kind, kept in recorder._issued.items():
                        if isinstance(doc, dict) and isinstance(doc.get(kind), str):
                            kept.add(doc[kind])
                self.send_response(resp.status_code)
                for key, val in resp.headers.items():
                    if key.lower() not in skip | {"content-encoding", "date", "server"}:
                        self.send_header(key, val)
                self.send_header("Content-Length", str(len(resp.content)))
                self.end_headers()
                self.wfile.write(resp.content)

            do_GET = do_POST = forward

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.client = client
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def issued(self) -> dict[str, frozenset[str]]:
        """What the IdP issued so far, by kind."""
        with self._lock:
            return {kind: frozenset(kept) for kind, kept in self._issued.items()}

    def __enter__(self) -> Recorder:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.client.close()


@contextmanager
def driven_broker(tmp: Path, daemon: str = "") -> Iterator[tuple[str, subprocess.Popen[str], dict[str, Any]]]:
    """A broker against a rotating dev IdP whose access tokens live 3 s, driven through known events:
    two tokens served to us, one refusal (a profile whose allow rules name another uid), a wrong
    password (rejected), an IdP that is down, and refreshes that rotate the refresh token. The IdP
    is reached through a ``Recorder``: ``seen["issued"]()`` is what it issued so far, by kind, and
    ``seen["started"]`` the wall clock just before and just after the broker started."""
    dead = f"http://127.0.0.1:{free_port()}"
    with dev_idp("--rotate", "--access-lifespan", "3") as upstream, Recorder(upstream) as recorder:
        idp = recorder.url
        cfg = _config(tmp, idp, dead, daemon)
        sock = str(tmp / "run" / "broker.sock")
        before = time.time()
        proc = start_run(cfg, sock, SECRETS)
        try:
            seen: dict[str, Any] = {"tokens": [], "issued": recorder.issued, "upstream": upstream}
            seen["started"] = (before, time.time())
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
        # the broker's state is made as it starts: between our clock before we started it and once it answered
        started_before, started_after = seen["started"]
        assert started_before <= value(fams, "dc_broker_start_time_seconds") <= started_after
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
        by_kind = seen["issued"]()
        issued = frozenset().union(*by_kind.values())  # every access, refresh and ID token the IdP gave
        assert all(len(kind) > rotations for kind in by_kind.values()) and set(seen["tokens"]) <= issued
        for token in issued:
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
        ask(sock, "set_secrets", profile="closed", password=SENTINEL_SET)  # no user's: closed is rejected
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
        # the IdP ends every session (an administrator's "log out all sessions"): good's refresh token
        # is refused, and the broker logs in again with the stored password, in the same generation
        with TokenClient(sock, cache=False) as broker:
            rotated = _metric(broker, "dc_broker_refresh_token_rotations", profile="good")
            wait_for(
                lambda: _metric(broker, "dc_broker_refresh_token_rotations", profile="good") > rotated,
                30,
                "a rotation since the person's login",
            )
            assert httpx.post(f"{seen['upstream']}/_dev/logout-all", timeout=10).json()["killed"] >= 1
            wait_for(
                lambda: _metric(broker, "dc_broker_relogins", profile="good", grant="password") == 2,
                30,
                "the re-login after the refused refresh token",
            )
            assert _metric(broker, "dc_broker_refresh_failures", profile="good", reason="token_dead") == 1
            exposition = broker.request("metrics")["text"]
        # a new username: the stored password (the sentinel) was the old user's, and is dropped
        new_user = subprocess.run(
            [DC_BROKER, "set", "closed", "username=other", "--config", str(cfg), "--socket", sock],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert new_user.returncode == 0, new_user.stderr
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
    assert ("set_secrets", "wrong", "ok") in changes and ("set_secrets", "closed", "ok") in changes
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
    # the re-login after the refused refresh token: in the generation the person's login began (one
    # after the first login's), the one its rotations carry
    good = [e for e in records if e.get("profile") == "good" and e.get("event") in ("relogin", "refresh_token_rotated")]
    first, again = [i for i, e in enumerate(good) if e["event"] == "relogin"]
    assert good[again]["grant"] == "password" and good[again - 1]["event"] == "refresh_token_rotated"
    assert good[again]["generation"] == good[again - 1]["generation"] == good[first]["generation"] + 1
    # the new username dropped the password set_secrets stored (the sentinel), in that password's
    # generation: set_secrets began it, the first change since the start (closed's login with it,
    # refused, is its last; its first login may have been that one, or one before set_secrets)
    (dropped,) = events["secrets_dropped"]
    closed = [e for e in events["relogin"] if e["profile"] == "closed"]
    assert (dropped["profile"], dropped["dropped"], dropped["changed"]) == ("closed", ["password"], ["username"])
    assert dropped["generation"] == closed[-1]["generation"] == 1
    assert dropped["level"] == "info" and dropped["logger"] == "dc_broker.audit"
    # no secret and no token anywhere in the log or the metrics: what we planted, what we were served,
    # and every token the IdP issued (refresh and ID tokens included, rotated ones too)
    by_kind = seen["issued"]()
    issued = frozenset().union(*by_kind.values())
    assert all(by_kind.values()) and set(seen["tokens"]) <= issued
    for secret in (SENTINEL_PASSWORD, SENTINEL_SET, SENTINEL_SECRET, *issued):
        assert secret not in stderr and secret not in exposition


def _passphrase_vault(tmp_path: Path, daemon: str = "") -> tuple[dict[str, str], str]:
    """A vault with the passphrase "correct horse" (a broker starts locked), a config with JSON logs,
    ``daemon`` settings and one profile (whose IdP is never reached); (env, socket path)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DC_BROKER_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), XDG_DATA_HOME=str(tmp_path / "data"))
    sock = str(tmp_path / "run" / "broker.sock")
    env["DC_BROKER_SOCKET"] = sock
    init = subprocess.run(
        [DC_BROKER, "init", "--passphrase-stdin"], input="correct horse\n", env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    cfg = tmp_path / "config" / "dc-broker" / "config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(
        f'[daemon]\nlog_format = "json"\n{daemon}\n'
        f'[profiles.svc]\ntoken_url = "http://127.0.0.1:{free_port()}/token"\nclient_id = "svc"\n'
        'grant = "client_credentials"\n'
    )
    return env, sock


def _vault_records(proc: subprocess.Popen[str]) -> tuple[list[tuple[str, str, int | None]], str]:
    """The broker's lock and unlock events (event, by, caller_uid), and all it wrote."""
    stderr = proc.stderr.read() if proc.stderr else ""
    records = [r for r in _records(stderr) if r.get("event") in ("vault_locked", "vault_unlocked")]
    return [(r["event"], r["by"], r.get("caller_uid")) for r in records], stderr


def test_lock_and_unlock_are_audited_with_who(tmp_path: Path) -> None:
    env, sock = _passphrase_vault(tmp_path)
    proc = subprocess.Popen([DC_BROKER, "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    scraped: list[dict[str, Any]] = []
    try:
        wait_for_socket(sock, proc)
        with TokenClient(sock, cache=False) as broker:
            scraped.append(families(broker.request("metrics")["text"]))  # locked from the start
            for args in (["unlock", "--passphrase-stdin"], ["lock"]):
                done = subprocess.run(
                    [DC_BROKER, *args], input="correct horse\n", env=env, capture_output=True, text=True, timeout=60
                )
                assert done.returncode == 0, done.stderr
                scraped.append(families(broker.request("metrics")["text"]))
    finally:
        assert stop(proc) == 0
    # the vault's gauge and the profile's state say it, locked at the start, open, locked again
    locked = [
        (value(fams, "dc_broker_vault_locked"), value(fams, "dc_broker_profile_state", profile="svc", state="locked"))
        for fams in scraped
    ]
    assert locked == [(1, 1), (0, 0), (1, 1)]
    events, stderr = _vault_records(proc)
    assert events == [("vault_unlocked", "caller", os.getuid()), ("vault_locked", "caller", os.getuid())]
    assert "correct horse" not in stderr


def test_the_auto_lock_is_audited_as_the_brokers_own(tmp_path: Path) -> None:
    env, sock = _passphrase_vault(tmp_path, "auto_lock_after = 2")
    proc = subprocess.Popen([DC_BROKER, "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_socket(sock, proc)
        done = subprocess.run(
            [DC_BROKER, "unlock", "--passphrase-stdin"], input="correct horse\n", env=env, capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        with TokenClient(sock, cache=False) as broker:
            wait_for(
                lambda: value(families(broker.request("metrics")["text"]), "dc_broker_vault_locked") == 1,
                30,
                "the vault to lock itself after 2 s without a token request",
                every=0.2,
            )
    finally:
        assert stop(proc) == 0
    events, stderr = _vault_records(proc)
    assert events == [("vault_unlocked", "caller", os.getuid()), ("vault_locked", "auto_lock", None)]
    auto = next(r for r in _records(stderr) if r.get("by") == "auto_lock")
    assert auto["message"] == "vault locked after 2 s without a token request" and auto["logger"] == "dc_broker.audit"


async def test_the_auto_lock_waits_a_full_period_after_an_unlock_and_idles_while_locked(make_idp: Any) -> None:
    """A vault locked for longer than the period costs auto_lock no CPU, and an unlock starts a full
    period (it once counted idle time from before the unlock, undoing it at once, and spun while
    locked). Real time: a loop that never blocks would not let a mock clock advance."""
    from dc_broker.serve.ops import BrokerState, auto_lock
    from dc_broker.sessions.registry import Sessions
    from tests.conftest import CREDENTIALS, LockableStore, idp_transport, profile

    store = LockableStore(dict(CREDENTIALS))
    store.lock()  # a passphrase vault: locked from the start
    sessions = Sessions({"demo": profile("demo")}, store, idp_transport(make_idp()))
    state = BrokerState(sessions=sessions, socket_path="-")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(auto_lock, state, 0.5)
        cpu = time.process_time()
        await trio.sleep(1.5)  # three periods, locked: nothing to do
        spent = time.process_time() - cpu
        store.unlock()
        sessions.unlocked()
        await trio.sleep(0.2)  # well within the period that starts with the unlock
        still_open = not store.locked
        nursery.cancel_scope.cancel()
    assert still_open, "the unlock was undone at once"
    assert spent < 0.5, f"auto_lock used {spent:.2f} s of CPU in 1.5 s while the vault was locked"


def test_a_login_without_an_end_has_no_login_ends_in_seconds(tmp_path: Path) -> None:
    """An offline login (Keycloak's refresh_expires_in 0) and a client-credentials one (no refresh
    token) have no end to count down to: the family has no sample for them; a user's login has."""
    with dev_idp() as idp:
        cfg = tmp_path / "config.toml"
        common = f'server = "{idp}"\ntenant = "demo"\n'
        cfg.write_text(
            f'[profiles.online]\n{common}client_id = "dc-cli"\nusername = "demo"\nscope = "openid"\n'
            f'[profiles.off]\n{common}client_id = "dc-cli"\nusername = "demo"\nscope = "openid offline_access"\n'
            f'[profiles.svc]\n{common}client_id = "dc-service"\ngrant = "client_credentials"\n'
        )
        secrets = (
            '[online]\npassword = "demo"\nclient_secret = "dc-cli-secret"\n'
            '[off]\npassword = "demo"\nclient_secret = "dc-cli-secret"\n'
            '[svc]\nclient_secret = "dc-service-secret"\n'
        )
        sock = str(tmp_path / "run" / "broker.sock")
        proc = start_run(cfg, sock, secrets)
        try:
            for name in ("online", "off", "svc"):
                got = dc_token(sock, name)
                assert got.returncode == 0, got.stderr
            with TokenClient(sock, cache=False) as broker:
                fams = families(broker.request("metrics")["text"])
                entries = {e["profile"]: e for e in broker.status_all()["profiles"]}
        finally:
            assert stop(proc) == 0
    ends = {s.labels["profile"]: s.value for s in fams["dc_broker_login_ends_in_seconds"].samples}
    assert set(ends) == {"online"} and 0 < ends["online"] <= entries["online"]["login_ends_in"] + 1
    assert entries["off"]["offline"] is True and entries["off"]["login_ends_in"] is None
    expires = {s.labels["profile"] for s in fams["dc_broker_token_expires_in_seconds"].samples}
    assert expires == {"online", "off", "svc"}  # each has a token: only its login has no end


#: a stdlib-only client for another user (who cannot read the venv): sends the frames given in hex,
#: prints the answer's frame in hex
_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(bytes.fromhex(sys.argv[2]))
s.settimeout(10)
buf = b""
while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "big"):
    data = s.recv(65536)
    if not data:
        break
    buf += data
print(buf.hex())
"""


def _as_nobody(sock: str, op: str) -> dict[str, Any]:
    """``op`` sent as user nobody (uid and group 65534); the broker's answer."""
    import msgpack

    from dc_token.protocol import Request, encode

    child = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", _CLIENT, sock,
         encode(Request(1, op)).hex()],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr
    raw = bytes.fromhex(child.stdout.strip())
    assert raw, "the broker closed the connection without an answer"
    answer: dict[str, Any] = msgpack.unpackb(raw[4:])
    return answer


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/usr/bin/setpriv"), reason="needs root and setpriv (another real user)"
)
def test_refused_callers_by_reason_from_another_real_user() -> None:
    """Another uid on a user's broker is ``foreign_uid``; a member of the shared broker's group
    asking for an admin op is ``not_admin``. User nobody, group nogroup: no account is made."""
    import shutil
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="dcb-refused-", dir="/tmp"))
    try:
        shared.chmod(0o755)
        cfg = shared / "config.toml"
        cfg.write_text('[daemon]\ngroup = "nogroup"\n')
        counted = {}
        for mode in ("user", "system"):
            sock = str(shared / mode / "broker.sock")  # a user's broker makes its directory 0700
            if mode == "system":
                (shared / mode).mkdir(mode=0o755)
            proc = start_run(cfg, sock, "", *(["--system"] if mode == "system" else []))
            try:
                if mode == "user":
                    os.chmod(shared / mode, 0o755)  # reachable: the broker itself must refuse the uid
                    os.chmod(sock, 0o666)
                    answer = _as_nobody(sock, "hello")
                    assert answer == {"id": 1, "ok": False, "error": {"code": "forbidden", "message": (
                        f"this broker serves only its own user (uid {os.getuid()}), not uid 65534")}}  # fmt: skip
                else:
                    answer = _as_nobody(sock, "lock")  # a member of the socket's group, not an admin
                    assert answer["error"] == {"code": "forbidden", "message": "only the broker's own user (or root) "
                                               "may change it"}  # fmt: skip
                with TokenClient(sock, cache=False) as broker:
                    fams = families(broker.request("metrics")["text"])
                counted[mode] = {
                    s.labels["reason"]: s.value
                    for s in fams["dc_broker_refused_callers"].samples
                    if s.name.endswith("_total")
                }
            finally:
                assert stop(proc) == 0
        assert counted["user"] == {"foreign_uid": 1, "not_allowed": 0, "not_admin": 0, "quota": 0}
        assert counted["system"] == {"foreign_uid": 0, "not_allowed": 0, "not_admin": 1, "quota": 0}
    finally:
        shutil.rmtree(shared, ignore_errors=True)


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
