"""Browser login end to end (authorization code + PKCE, loopback redirect): a real broker, a real dev
IdP, `dc-broker login --no-browser` as a user runs it, and a script in the browser's place that
follows the redirects and posts the login form. A wrong ``state`` and a replayed code are refused."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.e2e import DC_BROKER, dc_token, dev_idp, start_run, stop

pytestmark = pytest.mark.e2e


class FormFields(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "input" and a.get("type") == "hidden" and a.get("name"):
            self.fields[str(a["name"])] = a.get("value") or ""


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[str, str]]:
    with dev_idp() as base:
        cfg = tmp_path / "config.toml"
        cfg.write_text(
            f'[profiles.web]\nserver = "{base}"\ntenant = "demo"\nclient_id = "dc-public"\n'
            'grant = "browser"\nauth_method = "none"\n'
        )
        sock = str(tmp_path / "run" / "b.sock")
        proc = start_run(cfg, sock, "")
        try:
            yield sock, base
        finally:
            assert stop(proc) == 0


def start_login(sock: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [DC_BROKER, "login", "--no-browser", "--socket", sock, "web"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(r"(http://\S+/protocol/openid-connect/auth\?\S+)", line)
        if m:
            return proc, m.group(1)
    raise AssertionError(f"no URL printed: {proc.stderr.read() if proc.stderr else ''}")


def sign_in(url: str) -> str:
    """What the person does in the browser: open the page, post the form; the redirect's Location."""
    page = httpx.get(url, follow_redirects=False)
    assert page.status_code == 200 and "Sign in to demo" in page.text
    form = FormFields()
    form.feed(page.text)
    assert form.fields["code_challenge_method"] == "S256" and form.fields["state"]
    answer = httpx.post(url.split("?")[0], data={**form.fields, "username": "demo", "password": "demo"})
    assert answer.status_code == 302
    location = answer.headers["location"]
    assert location.startswith("http://127.0.0.1:") and "/callback?" in location
    return location


def test_a_browser_login_end_to_end_and_a_replayed_code_is_refused(broker: tuple[str, str]) -> None:
    sock, base = broker
    before = dc_token(sock, "web")
    assert before.returncode == 5 and "`dc-broker login web`" in before.stderr
    proc, url = start_login(sock)
    query = parse_qs(urlsplit(url).query)
    assert query["scope"] == ["openid"] and query["redirect_uri"][0].startswith("http://127.0.0.1:")
    location = sign_in(url)
    back = httpx.get(location)
    assert back.status_code == 200 and "close this window" in back.text
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Logged in: profile web has a token" in out
    assert dc_token(sock, "web").returncode == 0
    # the listener was one-shot
    with pytest.raises(httpx.ConnectError):
        httpx.get(location)
    # the code cannot be redeemed again, even with the right redirect_uri
    code = parse_qs(urlsplit(location).query)["code"][0]
    replay = httpx.post(
        f"{base}/realms/demo/protocol/openid-connect/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": query["redirect_uri"][0],
            "code_verifier": "x" * 64,
            "client_id": "dc-public",
        },
    )
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"


def test_a_wrong_state_is_refused(broker: tuple[str, str]) -> None:
    sock, _ = broker
    proc, url = start_login(sock)
    location = sign_in(url)
    forged = re.sub(r"state=[^&]+", "state=forged", location)
    httpx.get(forged)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 5, (out, err)
    assert "wrong state" in err and "`dc-broker login web` again" in err
    assert dc_token(sock, "web").returncode == 5
