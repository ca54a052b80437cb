"""dc-token's quick path (``dc_token.quick``) against the full command line (``dc_token.cli``).

``dc-token PROFILE`` runs ``quick.main``: it sends the request the full path would send, prints a
plain success itself and hands anything else over to ``cli.main`` with the connection. The promise
checked here: whatever a broker answers (a token, an error, garbage, a frame cut short, nothing),
both give the same exit status, stdout and stderr, and the broker is asked exactly once, with the
same bytes.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dc_token import cli, quick
from dc_token.cache import token_args
from dc_token.protocol import MAX_FRAME, Request, encode, minipack_codec
from tests.sockets import accept_in_thread

NAME_FIRST = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
names = st.text(NAME_FIRST, min_size=1, max_size=1).flatmap(
    lambda first: st.text(NAME_FIRST + "._-", max_size=127).map(lambda rest: first + rest)
)


@given(names)
def test_the_request_is_the_full_paths_byte_for_byte(profile: str) -> None:
    full = encode(Request(1, "token", token_args(profile, 0.0, None)), minipack_codec())
    assert quick.request(profile) == full


class FakeBroker:
    """A Unix socket that answers each connection's first frame with ``script`` (bytes, sent in
    ``chunks`` pieces), then closes; it records every request it read."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.script = b""
        self.chunks = 1
        self.requests: list[bytes] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(16)
        accept_in_thread(self.listener, self._serve)

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # a client may close before the script ends
            head = _read(conn, 4)
            self.requests.append(head + _read(conn, int.from_bytes(head, "big")))
            step = max(1, math.ceil(len(self.script) / self.chunks))
            for i in range(0, len(self.script), step):
                conn.sendall(self.script[i : i + step])
                time.sleep(0.001)

    def close(self) -> None:
        self.listener.close()


def _read(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        data = conn.recv(n - len(buf))
        if not data:
            break
        buf += data
    return buf


@pytest.fixture(scope="module")
def broker() -> Iterator[FakeBroker]:
    where = tempfile.mkdtemp(prefix="dcb-quick-")
    fake = FakeBroker(os.path.join(where, "broker.sock"))
    old = os.environ.get("DC_BROKER_SOCKET")
    os.environ["DC_BROKER_SOCKET"] = fake.path
    try:
        yield fake
    finally:
        fake.close()
        if old is None:
            del os.environ["DC_BROKER_SOCKET"]
        else:
            os.environ["DC_BROKER_SOCKET"] = old


def run(main: Callable[[], int], profile: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["dc-token", profile]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main()
    finally:
        sys.argv = argv
    return status, out.getvalue(), err.getvalue()


def frame(obj: object) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


now = time.time()
numbers = st.one_of(
    st.sampled_from([now + 600, now - 600, 0, math.nan, math.inf, -math.inf, 2**63 - 1]),
    st.floats(allow_nan=True),
    st.integers(-(2**63), 2**63 - 1),
    st.booleans(),
    st.text(max_size=5),
    st.none(),
)
tokens = st.one_of(
    st.just("eyJhbGciOi.eyJzdWIiOi.c2ln"), st.text(max_size=40), st.integers(-5, 5), st.none(), st.binary()
)
results = st.fixed_dictionaries(
    {},
    optional={
        "token": tokens,
        "expires_at": numbers,
        "expires_in": numbers,
        "type": st.sampled_from(["Bearer", "", None, 3]),
        "scope": st.sampled_from(["openid", "", None]),
        "profile": st.sampled_from(["acme", "", None]),
        "refresh_in": numbers,
        "min_ttl_shortfall": numbers,
        "end": st.booleans(),
    },
)
errors = st.fixed_dictionaries(
    {},
    optional={
        "code": st.sampled_from(["unknown_profile", "locked", "login_required", "overloaded", "nonsense", 7]),
        "message": st.one_of(st.text(max_size=30), st.integers(-5, 5)),
        "retry_after": numbers,
    },
)
#: the broker's own answer to a token request, and the small ways one could differ from it
plain = st.fixed_dictionaries(
    {
        "id": st.sampled_from([1, 1, 1, 1, 2, 0, True, 1.0]),
        "ok": st.sampled_from([True, True, True, 1]),
        "result": st.one_of(
            st.fixed_dictionaries(
                {
                    "token": st.one_of(
                        st.just("eyJhbGciOi.eyJzdWIiOi.c2ln"), st.text(max_size=40), st.sampled_from([None, 3])
                    ),
                    "expires_at": st.sampled_from([now + 600, 2**62, math.inf, now - 600, math.nan, int(now) + 900]),
                },
                optional={"type": st.just("Bearer"), "scope": st.just("openid"), "min_ttl_shortfall": numbers},
            ),
            st.sampled_from([None, "x", [1]]),
        ),
    },
    optional={"more": st.booleans(), "extra": st.just(0)},
)
replies = st.one_of(
    plain,
    plain,
    st.fixed_dictionaries(
        {"id": st.sampled_from([1, 1, 1, 2, 0, True, 1.0, None]), "ok": st.just(True), "result": results},
        optional={"more": st.booleans(), "extra": st.integers(-5, 5)},
    ),
    st.fixed_dictionaries({"id": st.sampled_from([1, None, 2]), "ok": st.just(False), "error": errors}),
    st.fixed_dictionaries({}, optional={"id": st.integers(-5, 5), "ok": st.sampled_from([1, "yes", None])}),
    st.lists(st.integers(-5, 5), max_size=3),
)
scripts = st.one_of(
    replies.map(frame),
    replies.map(frame).flatmap(lambda f: st.integers(0, len(f) - 1).map(lambda n: f[:n])),  # cut short
    st.tuples(replies.map(frame), replies.map(frame)).map(lambda pair: pair[0] + pair[1]),  # two frames
    st.binary(max_size=64),
    st.just(struct.pack(">I", MAX_FRAME + 1) + b"x" * 16),  # a header the wire refuses
)


def same_words(broker: FakeBroker, script: bytes, chunks: int, profile: str) -> None:
    broker.script, broker.chunks = script, chunks
    broker.requests.clear()
    fast = run(quick.main, profile)
    full = run(cli.main, profile)
    assert fast == full
    assert len(broker.requests) == 2 and broker.requests[0] == broker.requests[1] == quick.request(profile)


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(reply=plain, chunks=st.integers(1, 3))
def test_a_token_answer_or_one_a_little_off_is_said_the_same_by_quick_and_the_full_path(
    broker: FakeBroker, reply: dict[str, Any], chunks: int
) -> None:
    same_words(broker, frame(reply), chunks, "acme")


@SETTINGS
@given(script=scripts, chunks=st.integers(1, 3), profile=st.sampled_from(["acme", "a.b-c_d", "exec1"]))
def test_whatever_the_broker_answers_quick_and_the_full_path_say_the_same(
    broker: FakeBroker, script: bytes, chunks: int, profile: str
) -> None:
    same_words(broker, script, chunks, profile)


def test_quick_knows_every_form_the_full_path_knows() -> None:
    assert set(quick.FORMS) == set(cli.FORMS)


@pytest.mark.parametrize(
    "argv", [["exec", "acme", "--", "true"], ["git-credential", "get"], ["acme", "--header"], ["--help"], ["a b"]]
)
def test_any_other_command_line_goes_to_the_full_path_untouched(
    broker: FakeBroker, argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[list[str], Any]] = []
    monkeypatch.setattr(cli, "main", lambda a, handover=None: seen.append((a, handover)) or 0)
    monkeypatch.setattr(sys, "argv", ["dc-token", *argv])
    broker.requests.clear()
    assert quick.main() == 0
    assert seen == [(argv, None)] and broker.requests == []


def test_a_broker_that_never_answers_times_out_once_with_the_full_paths_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "mute.sock")
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(path)
    mute.listen(4)  # the kernel accepts; nobody answers
    monkeypatch.setenv("DC_BROKER_SOCKET", path)
    monkeypatch.setattr(quick, "TIMEOUT", 0.2)
    monkeypatch.setattr(cli, "TIMEOUT", 0.2)
    try:
        started = time.monotonic()
        status, out, err = run(quick.main, "acme")
        took = time.monotonic() - started
    finally:
        mute.close()
    assert (status, out) == (3, "")
    assert err.startswith(f"dc-token: the broker on {path} did not answer within 0.2 s"), err
    assert took < 2.0  # one wait, not one in quick and another in the full path


def test_no_broker_is_said_as_the_full_path_says_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DC_BROKER_SOCKET", str(tmp_path / "nobody.sock"))
    assert run(quick.main, "acme") == run(cli.main, "acme")
    assert run(quick.main, "acme")[0] == 3
