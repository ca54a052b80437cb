"""Every caller gets an answer that fits, and no connection holds the broker for longer than its limits
(issue 13, findings 4 and 7, and the idle timeout of 3): a live `dc-broker run` with 1,000 profiles
whose IdP is out with 70 KB error messages; a 20,000-byte profile name; a frame dripped a byte at a
time; a connection that sends nothing."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgpack
import pytest

from dc_broker.serve.ops import STATUS_FIELD_MAX
from dc_broker.serve.server import _reply_frame
from dc_token.protocol import MAX_FRAME, Request, encode
from tests.e2e import start_run, stop, wait_for

pytestmark = pytest.mark.e2e

PROFILES = 1000
IDP_MESSAGE = "the identity provider is down for maintenance; " * 1500  # ~70 KB


class _Outage(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"error": "temporarily_unavailable", "error_description": IDP_MESSAGE}).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # 1,000 profiles start within seconds
    daemon_threads = True


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    assert len(IDP_MESSAGE) > 70_000
    idp = _Server(("127.0.0.1", 0), _Outage)
    threading.Thread(target=idp.serve_forever, daemon=True).start()
    tmp = tmp_path_factory.mktemp("limits")
    url = f"http://127.0.0.1:{idp.server_address[1]}/token"
    text = "[daemon]\npartial_frame_timeout = 0.5\nidle_timeout = 1.0\n"
    for i in range(PROFILES):
        text += f'[profiles.p{i:04d}]\ntoken_url = "{url}"\nclient_id = "c"\ngrant = "client_credentials"\n'
    (tmp / "config.toml").write_text(text)
    secrets = "".join(f'[p{i:04d}]\nclient_secret = "s"\n' for i in range(PROFILES))
    sock = str(tmp / "run" / "b.sock")
    proc = start_run(tmp / "config.toml", sock, secrets, stderr=subprocess.DEVNULL)
    try:
        yield sock
    finally:
        quick_stop(proc)
        idp.shutdown()


def quick_stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, then (once the first is taken) a second one: stop without waiting for refreshes."""
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 2
    while proc.poll() is None and time.monotonic() < deadline:  # signals do not queue: let it see the first
        time.sleep(0.05)
    stop(proc)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A broker with one profile and the same short deadlines, for the tests that time the broker."""
    tmp = tmp_path_factory.mktemp("small")
    text = "[daemon]\npartial_frame_timeout = 0.5\nidle_timeout = 1.0\n"
    text += '[profiles.p]\ntoken_url = "http://127.0.0.1:9/token"\nclient_id = "c"\ngrant = "client_credentials"\n'
    (tmp / "config.toml").write_text(text)
    sock = str(tmp / "run" / "b.sock")
    proc = start_run(tmp / "config.toml", sock, '[p]\nclient_secret = "s"\n', stderr=subprocess.DEVNULL)
    try:
        yield sock
    finally:
        quick_stop(proc)


def roundtrip(sock: str, *requests: Request) -> list[tuple[int, dict[str, Any]]]:
    """(frame size, decoded reply) for each request, all on one connection."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(sock)
    try:
        s.sendall(b"".join(encode(r) for r in requests))
        out, buf = [], b""
        while len(out) < len(requests):
            while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                size = int.from_bytes(buf[:4], "big")
                out.append((size, msgpack.unpackb(buf[4 : 4 + size])))
                buf = buf[4 + size :]
            if len(out) < len(requests):
                data = s.recv(65536)
                assert data, f"connection closed after {len(out)} of {len(requests)} replies"
                buf += data
        return out
    finally:
        s.close()


def every_profile(sock: str) -> list[dict[str, Any]]:
    """Every profile's status entry, page by page with the ``after`` cursor; each page fits a frame."""
    entries: list[dict[str, Any]] = []
    after = None
    while True:
        [(size, reply)] = roundtrip(sock, Request(1, "status", {} if after is None else {"after": after}))
        assert reply["ok"] and size <= MAX_FRAME
        broker = reply["result"]["broker"]
        assert broker["profiles"] == PROFILES and sum(broker["states"].values()) == PROFILES
        entries += reply["result"]["profiles"]
        after = broker["next"]
        assert (after is None) == (broker["truncated"] == 0)
        if after is None:
            return entries


#: how many of the PROFILES must hold the IdP's own (cut) answer: a profile whose attempt met a reset
#: or a timeout is retried within seconds (the first backoff is at most backoff_base, 1 s) and then
#: gets the IdP's answer too, so nearly all do; a run where only a few did checks nearly nothing
MOST = PROFILES * 95 // 100


def test_status_of_a_thousand_profiles_in_an_outage_fits_one_frame(broker: str) -> None:
    """Every profile the IdP refused (state rejected: its 400 carried the 70 KB message) holds that
    message cut (the IdP's text to 300 characters, the whole within ``STATUS_FIELD_MAX``), every one of them, and that is at least ``MOST`` of them. A
    profile whose latest attempt met a reset or a timeout instead (1,000 attempts at once on a loaded
    machine) is unavailable, and its error is the transport's, short and not the IdP's text: it is
    held to the length bound only. (An earlier version checked that at least one profile was cut,
    which let all but one go unchecked; then that every rejected one was, which one would satisfy.)"""

    def most_rejected() -> list[dict[str, Any]] | None:
        entries = every_profile(broker)
        rejected = sum(e["state"] == "rejected" for e in entries)
        return entries if all(e["last_error"] for e in entries) and rejected >= MOST else None

    entries = wait_for(most_rejected, 120, f"a last_error on every profile, the IdP's on {MOST}", every=0.5)
    assert [e["profile"] for e in entries] == [f"p{i:04d}" for i in range(PROFILES)]  # each once, in order
    rejected = [e for e in entries if e["state"] == "rejected"]
    unavailable = [e for e in entries if e["state"] == "unavailable"]
    assert len(rejected) + len(unavailable) == PROFILES, {e["state"] for e in entries}
    for entry in entries:
        assert len(entry["last_error"]) <= STATUS_FIELD_MAX, entry
    for entry in rejected:  # the IdP's 70 KB cut where IdP text is cut (…), the broker's advice after it whole
        error = entry["last_error"]
        assert "down for maintenance" in error and "…)" in error, entry
        assert error.endswith(f"; store the right one with `dc-broker rotate {entry['profile']} --client-secret`")
    for entry in unavailable:
        assert "down for maintenance" not in entry["last_error"], entry
    [(size, one)] = roundtrip(broker, Request(2, "status", {"profile": "p0500"}))
    assert one["ok"] and size < 4096


@pytest.mark.parametrize("name", ["a" * 20_000, "\u00e9" * 10_000, "\x00" * 20_000, "p0001/../p0002"])
def test_a_huge_or_odd_profile_name_is_a_bad_request(broker: str, name: str) -> None:
    replies = roundtrip(
        broker,
        Request(1, "token", {"profile": name}),
        Request(2, "status", {"profile": name}),
        Request(3, "login", {"profile": name}),
        Request(4, "hello"),
    )
    assert [r["error"]["code"] for _, r in replies[:3]] == ["bad_request"] * 3
    assert all(size < 1024 for size, _ in replies[:3])
    assert replies[3][1]["ok"]  # the connection lives on


def test_a_reply_that_would_not_fit_becomes_an_error_reply() -> None:
    frame = _reply_frame(9, {"blob": "x" * (MAX_FRAME + 1)})
    reply = msgpack.unpackb(frame[4:])
    assert reply["id"] == 9 and reply["error"]["code"] == "internal" and "frame limit" in reply["error"]["message"]


def test_a_dripped_frame_gets_one_deadline_for_the_whole_frame(small: str) -> None:
    frame = encode(Request(1, "hello"))
    s = socket.socket(socket.AF_UNIX)
    s.connect(small)
    t0 = time.monotonic()
    try:
        for byte in frame[:-1]:  # one byte every 0.1 s: each recv is quick, the frame is not
            s.sendall(bytes([byte]))
            time.sleep(0.1)  # the drip under test
            if time.monotonic() - t0 > 3:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    s.settimeout(5)
    with contextlib.suppress(ConnectionResetError):
        assert s.recv(100) == b""
    assert time.monotonic() - t0 < 2.0  # closed about 0.5 s after the first byte, not extended by each byte
    s.close()


def test_a_connection_that_sends_nothing_is_closed_and_one_that_talks_is_not(small: str) -> None:
    idle = socket.socket(socket.AF_UNIX)
    idle.connect(small)
    talking = socket.socket(socket.AF_UNIX)
    talking.connect(small)
    talking.settimeout(5)
    idle.settimeout(5)
    t0 = time.monotonic()
    for i in range(5):  # 2 s of a request every 0.4 s: longer than idle_timeout, never idle that long
        talking.sendall(encode(Request(i, "hello")))
        assert talking.recv(65536)
        time.sleep(0.4)  # the pace under test: never idle for idle_timeout
    assert idle.recv(100) == b""  # closed by the broker after idle_timeout (1 s)
    assert 0.9 < time.monotonic() - t0 < 5
    idle.close()
    talking.close()
