"""What the docs promise a newcomer, held to the code (issue 24, "docs drift"): each fix of that list
stays fixed. A test reads the text a person reads (README.md, docs/recipes.md, `dc-broker add
--help`) and compares it with what the code does, not with a copy of the sentence."""

from __future__ import annotations

import re
from pathlib import Path

import trio
from click.testing import CliRunner

from dc_broker.access.rules import KINDS
from dc_broker.cli import cli as dc_broker
from dc_broker.sessions import loopback

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
RECIPES = (ROOT / "docs" / "recipes.md").read_text()


def flat(text: str) -> str:
    """``text`` as one line: the line breaks of a paragraph (or of click's wrapping, which may break
    a word after a hyphen) are not part of what it says."""
    return re.sub(r"\s+", " ", re.sub(r"(?<=\w-)\n\s*", "", text))


def section(markdown: str, title: str) -> str:
    """The text under ``## title``, up to the next heading of that level."""
    start = markdown.index(f"\n## {title}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end >= 0 else len(markdown)]


def test_the_readme_says_the_broker_runs_on_linux_only() -> None:
    assert "It runs on Linux only (it reads callers from the kernel: `SO_PEERCRED` and `/proc`" in flat(
        section(README, "Install")
    )


def test_the_install_section_runs_daemon_reload_after_installing_the_units() -> None:
    install = section(README, "Install")
    assert "dc-broker systemd install --user && systemctl --user daemon-reload\n" in install
    assert install.index("systemctl --user daemon-reload") < install.index("systemctl --user enable --now")


def test_the_readme_says_a_hand_edit_is_read_again_on_sighup() -> None:
    text = flat(README)
    assert (
        "A file you edit by hand is read again on `systemctl --user reload dc-broker` (SIGHUP; `kill -HUP` for a "
        "`dc-broker run`)" in text
    )


def test_the_git_recipe_says_a_per_path_profile_needs_use_http_path() -> None:
    assert re.search(r"git config --global credential\.https://\S+\.useHttpPath true +# needed for a per-path", RECIPES)


def test_dc_tokens_cost_is_the_same_figure_in_the_readme_and_the_recipes() -> None:
    figure = re.compile(r"~(\d+(?:\.\d+)?)x `python -c '([^']*)'`")
    in_readme = figure.findall(flat(README))
    in_recipes = figure.findall(flat(RECIPES))
    assert len(in_readme) == 1 and in_readme == in_recipes, (in_readme, in_recipes)


def test_the_redirect_uri_to_register_is_the_path_the_browser_login_listens_on() -> None:
    """README names the redirect URI to register at the IdP; the login sends that path
    (sessions/logins.py) and the loopback listener answers it (and only it)."""
    [registered] = re.findall(r"register the redirect URI http://127\.0\.0\.1(/\S*)", README)
    logins = (ROOT / "broker" / "dc_broker" / "sessions" / "logins.py").read_text()
    assert re.findall(r'redirect_uri = f"http://127\.0\.0\.1:\{port\}(/[^"]*)"', logins) == [registered]

    async def status_of(path: str) -> bytes:
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        got: dict[str, str] = {}
        answers: list[bytes] = []

        async def take() -> None:
            got.update(await loopback.one_redirect(listener))

        async def browse(target: str) -> None:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                answer = b""
                while chunk := await stream.receive_some(4096):
                    answer += chunk
                answers.append(answer.split(b"\r\n", 1)[0])

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(take)
                await browse(f"{path}?code=c&state=s")
                if path != registered:  # not the path it waits for: it still waits, for that one
                    await browse(f"{registered}?code=c&state=s")
        await listener.aclose()
        assert got == {"code": "c", "state": "s"}
        return answers[0]

    assert trio.run(status_of, registered) == b"HTTP/1.1 200 OK"
    assert trio.run(status_of, "/elsewhere") == b"HTTP/1.1 404 Not Found"


def test_add_help_names_every_kind_of_allow_rule() -> None:
    result = CliRunner().invoke(dc_broker, ["add", "--help"])
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    missing = [kind for kind in KINDS if not re.search(rf"(?<![\w-]){re.escape(kind)}:", text)]
    assert missing == []
    assert '"A & B" for both' in text
