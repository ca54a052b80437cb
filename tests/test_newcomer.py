# ruff: noqa: F811 - the home fixture comes from tests.test_cli
"""What a newcomer met (issue 24), each as they met it: real processes, the real dev IdP, the exact
output. A test that needs root (to be another user with setpriv) says so when it skips, and fails
under CI=true (tests/conftest.py); the rest run as any user: an expected message that names a
directory's group takes the group the directory really has (``group_of``)."""

from __future__ import annotations

import grp
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dc_broker.cli.completion import script
from tests.e2e import DC_BROKER, dc_token, stop, wait_for, wait_for_socket
from tests.test_cli import add_demo, cli, home, init_keyfile, on_a_terminal  # noqa: F401 - the home fixture
from tests.test_sinks import group_of

pytestmark = pytest.mark.e2e
ROOT = os.geteuid() == 0


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A TCP port on 127.0.0.1 that refuses connections: bound (so no one else gets it) and never
    listening, so the kernel answers every connection with a reset."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


def add_service(env: dict[str, str], idp: str, secret: str = "dc-service-secret") -> subprocess.CompletedProcess[str]:
    return cli(env, "add", "svc", "--server", idp, "--tenant", "demo", "--client-id", "dc-service",
               "--grant", "client_credentials", "--secret-stdin", stdin=f"{secret}\n")  # fmt: skip


@pytest.fixture
def broker(home: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    daemon = subprocess.Popen([DC_BROKER, "run"], env=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_socket(home["DC_BROKER_SOCKET"], daemon)
        yield daemon
    finally:
        stop(daemon)


# ---------------------------------------------------------------- a failed add


def test_a_failed_add_says_nothing_was_added_and_to_add_it_again(
    idp: str, home: dict[str, str], tmp_path: Path
) -> None:
    init_keyfile(home, tmp_path)
    result = add_demo(home, idp, name="acme2", password="wrong")
    assert result.returncode == 8
    assert result.stderr == (
        "Error: profile 'acme2': the identity provider refused the password of user 'demo' (HTTP 401: "
        "invalid_grant: Invalid user credentials); nothing was added: run `dc-broker add acme2 ...` again "
        "once it is fixed\n"
    )
    assert "login" not in result.stderr  # `dc-broker login acme2` would answer "no profile named 'acme2'"
    bad_secret = add_service(home, idp, secret="wrong-secret")
    assert bad_secret.returncode == 8
    assert bad_secret.stderr == (
        "Error: profile 'svc': the identity provider refuses client 'dc-service' (HTTP 401: unauthorized_client: "
        "Invalid client or Invalid client credentials); nothing was added: run `dc-broker add svc ...` again "
        "once it is fixed\n"
    )
    bad_tenant = cli(home, "add", "acme3", "--server", idp, "--tenant", "nosuch", "--client-id", "dc-cli",
                     "--username", "demo", "--password-stdin", "--secret-stdin",
                     stdin="demo\ndc-cli-secret\n")  # fmt: skip
    assert bad_tenant.returncode == 8
    assert bad_tenant.stderr == (
        f"Error: profile 'acme3': {idp}/auth/realms/nosuch/protocol/openid-connect/token answers HTTP 404 Not "
        "Found (Realm does not exist); check server, tenant, legacy_paths (Keycloak 17+ has no /auth) or issuer; "
        "nothing was added: run `dc-broker add acme3 ...` again once it is fixed\n"
    )
    for failed in (result, bad_secret, bad_tenant):
        assert "login" not in failed.stderr
    config = tmp_path / "config" / "dc-broker" / "config.toml"
    assert not config.exists()
    # over a profile that exists, --force with a wrong password changed nothing, and says so
    assert add_demo(home, idp, name="acme2").returncode == 0
    before = config.read_bytes()
    forced = cli(home, "add", "--force", "acme2", "--server", idp, "--tenant", "demo", "--client-id", "dc-cli",
                 "--username", "demo", "--password-stdin", "--secret-stdin",
                 stdin="wrong\ndc-cli-secret\n")  # fmt: skip
    assert (forced.returncode, forced.stdout) == (8, "")
    assert forced.stderr == (
        "Error: profile 'acme2': the identity provider refused the password of user 'demo' (HTTP 401: "
        "invalid_grant: Invalid user credentials); nothing changed: run `dc-broker add --force acme2 ...` again "
        "once it is fixed\n"
    )
    assert config.read_bytes() == before


# ---------------------------------------------------------------- files of other users, key directories


@pytest.mark.skipif(not ROOT, reason="needs root to run dc-broker as another user (setpriv)")
def test_add_as_another_user_against_a_root_owned_config_says_whose_file_it_is(tmp_path: Path) -> None:
    shared = Path(tempfile.mkdtemp(prefix="dcb-shared-"))
    try:
        shared.chmod(0o755)
        (shared / "etc").mkdir(mode=0o755)
        cfg = shared / "etc" / "config.toml"
        cfg.write_text(
            '[profiles.kept]\ntoken_url = "https://x.example/t"\nclient_id = "k"\ngrant = "client_credentials"\n'
        )
        cfg.chmod(0o644)
        env = {"PATH": os.environ["PATH"], "HOME": str(shared), "LANG": "C.UTF-8"}
        done = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", DC_BROKER, "add", "dev1", "--config",
             str(cfg), "--socket", str(shared / "none.sock"), "--server", "https://sso.example.com", "--tenant", "t",
             "--client-id", "c", "--grant", "device", "--no-verify"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert done.stderr == (
            f"Error: cannot write the config file {cfg} as user nobody (uid 65534): permission denied. It "
            "belongs to someone else (a shared broker's config is root's): edit it as its owner, e.g. "
            f"`sudo dc-broker ... --config {cfg}`, or give --config a file of your own\n"
        )
        assert "dev1" not in cfg.read_text()
    finally:
        shutil.rmtree(shared)


def test_a_key_file_in_a_mkdir_p_directory_is_accepted_and_an_open_one_refused_with_the_rule(
    home: dict[str, str], tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o755)  # what `mkdir -p ~/keys` makes: the user's, writable by no one else
    keys.chmod(0o755)
    made = cli(home, "init", "--key-source", "keyfile", "--key-file", str(keys / "vault.key"))
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE((keys / "vault.key").stat().st_mode) == 0o600
    stored = cli(home, "add", "svc", "--token-url", "https://x.example/t", "--client-id", "s", "--grant",
                 "client_credentials", "--secret-stdin", "--no-verify", stdin="s3cret\n")  # fmt: skip
    assert stored.returncode == 0, stored.stderr  # the key is read from there
    open_keys = tmp_path / "team-keys"
    open_keys.mkdir()
    open_keys.chmod(0o775)  # the group may write: it could swap the key
    env = {**home, "DC_BROKER_VAULT": str(tmp_path / "other" / "vault.db")}
    refused = cli(env, "init", "--key-source", "keyfile", "--key-file", str(open_keys / "vault.key"))
    assert refused.returncode == 2
    assert refused.stderr == (
        f"Error: refusing to put the key file {open_keys}/vault.key there: {open_keys} has mode 0775: "
        f"{group_of(open_keys)} may write in it and could replace what is in it; every directory from the "
        "file's up to / must be owned by you or root and writable by no one else (sticky directories like /tmp "
        "excepted), as OpenSSH's StrictModes asks\n"
    )
    assert not (open_keys / "vault.key").exists()


# ---------------------------------------------------------------- client credentials after logout, rotate


def test_login_after_logout_of_a_client_credentials_profile_names_rotate(
    idp: str, home: dict[str, str], tmp_path: Path
) -> None:
    init_keyfile(home, tmp_path)
    assert add_service(home, idp).returncode == 0
    daemon = subprocess.Popen([DC_BROKER, "run"], env=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_socket(home["DC_BROKER_SOCKET"], daemon)
        out = cli(home, "logout", "svc")
        assert out.returncode == 0, out.stderr
        assert out.stdout.endswith(
            "its client secret forgotten (`dc-broker rotate svc --client-secret` stores one again).\n"
        )
        login = cli(home, "login", "svc")
        assert login.returncode == 5  # login required: not "nothing to log in", exit 0
        assert login.stderr == (
            "Error: profile 'svc' uses client credentials and has no client secret stored (`dc-broker logout` "
            "forgets it): store it again with `dc-broker rotate svc --client-secret`\n"
        )
        wrong = cli(home, "rotate", "svc", "--client-secret", "--secret-stdin", stdin="wrong-secret\n")
        assert wrong.returncode == 8
        assert wrong.stderr == (
            "Error: profile 'svc': the identity provider refuses client 'dc-service' (HTTP 401: unauthorized_client: "
            "Invalid client or Invalid client credentials); nothing changed: run `dc-broker rotate svc "
            "--client-secret` again with the right one\n"
        )
        ok = cli(home, "rotate", "svc", "--client-secret", "--secret-stdin", stdin="dc-service-secret\n")
        assert ok.returncode == 0, ok.stderr
        assert dc_token(home["DC_BROKER_SOCKET"], "svc").returncode == 0
    finally:
        assert stop(daemon) == 0


def test_dc_token_after_logout_of_a_client_credentials_profile_names_rotate(
    idp: str, home: dict[str, str], tmp_path: Path
) -> None:
    init_keyfile(home, tmp_path)
    assert add_service(home, idp).returncode == 0
    daemon = subprocess.Popen([DC_BROKER, "run"], env=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_socket(home["DC_BROKER_SOCKET"], daemon)
        assert cli(home, "logout", "svc").returncode == 0
        token = dc_token(home["DC_BROKER_SOCKET"], "svc")
        assert (token.returncode, token.stdout) == (5, "")
        assert token.stderr == (
            "dc-token: profile 'svc': no client secret stored; store it with `dc-broker rotate svc --client-secret`\n"
        )  # not `remove` + `add`
    finally:
        assert stop(daemon) == 0


# ---------------------------------------------------------------- set on a running broker


def test_set_scope_on_a_running_broker_says_when_it_applies_and_it_does(
    idp: str, home: dict[str, str], tmp_path: Path
) -> None:
    init_keyfile(home, tmp_path)
    assert add_demo(home, idp).returncode == 0
    daemon = subprocess.Popen([DC_BROKER, "run"], env=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sock = home["DC_BROKER_SOCKET"]
        wait_for_socket(sock, daemon)
        assert dc_token(sock, "acme").returncode == 0
        out = cli(home, "set", "acme", "scope=openid email")
        assert out.stdout == (
            'Updated profile acme: scope = "openid email". The running broker has reloaded it: its next token '
            "is got with these settings.\n"
        )

        def scope() -> str:
            got = dc_token(sock, "acme", "--json")
            return json.loads(got.stdout)["scope"] if got.returncode == 0 else ""

        assert wait_for(lambda: "email" in scope().split(), 10, "the new scope")
    finally:
        assert stop(daemon) == 0


# ---------------------------------------------------------------- who may connect


def no_permission(sock: Path) -> str:
    """What a user outside a shared broker's group is told: whose group it is and how to join it."""
    group = grp.getgrgid(sock.stat().st_gid).gr_name
    return (
        f"no permission to use the broker socket {sock}: the shared broker there admits members of group "
        f"{group!r}, and you are not one; ask its administrator to add you (`usermod -aG {group} $USER`), then "
        "log in again"
    )


@pytest.mark.skipif(not ROOT, reason="needs root to run dc-token as another user (setpriv)")
def test_a_caller_outside_the_shared_brokers_group_gets_the_permission_exit_code(tmp_path: Path) -> None:
    shared = Path(tempfile.mkdtemp(prefix="dcb-sock-"))
    try:
        shared.chmod(0o755)
        sock = shared / "broker.sock"
        import socket as socket_module

        listener = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
        listener.bind(str(sock))
        sock.chmod(0o660)  # root and its group only
        listener.listen(1)
        # dc-token as user nobody runs it: the token path needs nothing but dc_token and the standard
        # library (tests/test_startup.py), so a world-readable copy of the package is all it needs
        shutil.copytree(Path(__file__).resolve().parent.parent / "client" / "dc_token", shared / "dc_token")
        for path in [shared / "dc_token", *(shared / "dc_token").rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        run = f"import sys; sys.path.insert(0, {str(shared)!r}); from dc_token.cli import main; sys.exit(main())"
        done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                               "-S", "-c", run, "--socket", str(sock), "acme"],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        listener.close()
        assert done.returncode == 9
        assert done.stderr == f"dc-token: {no_permission(sock)}\n"
    finally:
        shutil.rmtree(shared)


# ---------------------------------------------------------------- an IdP that refuses connections


def test_a_refused_connection_to_the_idp_is_not_called_slow(
    home: dict[str, str], tmp_path: Path, closed_port: int
) -> None:
    """`add`, then `dc-token` through a running broker, against an IdP address where nothing listens:
    each says nothing answers there and what that means, not "did not answer in time; try again"."""
    init_keyfile(home, tmp_path)
    server = f"http://127.0.0.1:{closed_port}"
    refused = (
        f"nothing answers at 127.0.0.1:{closed_port} (connection refused): the server URL is wrong or the identity "
        "provider is not running"
    )
    result = cli(home, "add", "x", "--server", server, "--tenant", "t", "--client-id", "c",
                 "--username", "u", "--password-stdin", "--secret-stdin", stdin="p\ns\n")  # fmt: skip
    assert result.returncode == 7
    assert result.stderr == (
        f"Error: could not verify profile 'x' at {server}/auth/realms/t/protocol/openid-connect/token: {refused}; "
        "check the URL, or store it anyway with --no-verify; nothing was added: run `dc-broker add x ...` again "
        "once it is fixed\n"
    )
    stored = cli(home, "add", "svc", "--server", server, "--tenant", "t", "--client-id", "c", "--grant",
                 "client_credentials", "--secret-stdin", "--no-verify", stdin="s3cret\n")  # fmt: skip
    assert stored.returncode == 0, stored.stderr
    daemon = subprocess.Popen([DC_BROKER, "run"], env=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_socket(home["DC_BROKER_SOCKET"], daemon)
        token = dc_token(home["DC_BROKER_SOCKET"], "svc")
        assert (token.returncode, token.stdout) == (7, "")
        assert token.stderr == f"dc-token: profile 'svc': {refused}\n"
    finally:
        assert stop(daemon) == 0


async def test_a_refused_connection_and_a_timeout_are_told_apart(closed_port: int) -> None:
    """The broker's transport says which one it was, and dc-token's hint follows: a timeout keeps
    "did not answer in time; try again shortly", a refused connection gets no such hint."""
    import httpx

    from dc_broker.errors import UpstreamTransient
    from dc_broker.idp.oidc import HttpRequest
    from dc_broker.idp.transport import IdpTransport
    from dc_token.errors import UpstreamUnavailable, hint_for

    def grant(url: str) -> HttpRequest:
        return HttpRequest("POST", url, {}, {"grant_type": "client_credentials"})

    async def failure(transport: IdpTransport, url: str, proxy: str | None = None) -> str:
        try:
            with pytest.raises(UpstreamTransient) as caught:
                await transport.send(grant(url), proxy=proxy)
        finally:
            await transport.aclose()
        return str(caught.value)

    refused = await failure(IdpTransport(environ={}), f"http://127.0.0.1:{closed_port}/token")
    assert refused == (
        f"nothing answers at 127.0.0.1:{closed_port} (connection refused): the server URL is wrong or the identity "
        "provider is not running"
    )
    assert hint_for(UpstreamUnavailable(f"profile 'svc': {refused}"), "svc") == ""
    no_proxy = await failure(
        IdpTransport(environ={}), "https://sso.example.com/token", f"http://127.0.0.1:{closed_port}"
    )
    assert no_proxy == (
        f"nothing answers at 127.0.0.1:{closed_port} (connection refused), the way to https://sso.example.com via "
        f"proxy http://127.0.0.1:{closed_port}: the proxy setting is wrong or the proxy is not running"
    )

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out", request=request)

    timed_out = await failure(
        IdpTransport(transport=httpx.MockTransport(slow), environ={}), "https://sso.example.com/token"
    )
    assert timed_out == "identity provider timed out (ConnectTimeout) at https://sso.example.com"
    assert hint_for(UpstreamUnavailable(f"profile 'svc': {timed_out}"), "svc") == (
        "the identity provider could not be reached or did not answer in time; try again shortly"
    )


# ---------------------------------------------------------------- prompts


def test_enter_at_the_client_secret_prompt_says_how_to_add_a_public_client(
    home: dict[str, str], tmp_path: Path
) -> None:
    init_keyfile(home, tmp_path)
    status, shown = on_a_terminal(home, "add", "pub", "--server", "http://127.0.0.1:9", "--tenant", "t",
                                  "--client-id", "cli-app", "--grant", "client_credentials", "--no-verify",
                                  answer="")  # fmt: skip
    text = shown.decode()
    assert status == 2
    assert "Client secret of cli-app (profile pub): " in text  # the prompt names the client and the profile
    assert text.count("(profile pub): ") == 1  # asked once, not again and again
    assert (
        "Error: Client secret of cli-app (profile pub) is empty; a public client has none: add it with "
        "--auth-method none" in text
    )


def test_the_password_prompt_names_the_user_and_the_profile(home: dict[str, str], tmp_path: Path) -> None:
    init_keyfile(home, tmp_path)
    _, shown = on_a_terminal(home, "add", "acme", "--server", "http://127.0.0.1:9", "--tenant", "t",
                             "--client-id", "c", "--username", "alice", "--no-verify", answer="")  # fmt: skip
    assert "Password of user alice (profile acme): " in shown.decode()


# ---------------------------------------------------------------- a second broker, the dev extra


def test_a_second_run_says_a_broker_already_runs_and_where(home: dict[str, str], broker: subprocess.Popen[str]) -> None:
    second = subprocess.run([DC_BROKER, "run"], env=home, capture_output=True, text=True, timeout=30)
    assert second.returncode == 2
    sock = home["DC_BROKER_SOCKET"]
    from importlib.metadata import version

    assert second.stderr == (
        f"Error: a dc-broker already runs on {sock} (pid {broker.pid}, version {version('dc-broker')}): use it "
        "(`dc-broker status`), or stop it first (`systemctl --user stop dc-broker`, or end that pid)\n"
    )  # not "send the change to it instead"


BLOCK_DEV_EXTRA = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("hypercorn", "starlette"):
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
sys.prefix = PREFIX
sys.argv = ["dc-broker", "dev"]
from dc_broker.cli import main
main()
"""


@pytest.mark.parametrize(
    ("prefix", "advice"),
    [
        ("/home/u/.local/share/pipx/venvs/dc-broker", "`pipx inject dc-broker hypercorn starlette`"),
        (
            "/opt/dc-broker",
            f"`{sys.executable} -m pip install hypercorn starlette` (what `pip install 'dc-broker[dev]'` adds)",
        ),
    ],
    ids=["pipx", "pip"],
)
def test_dev_without_the_dev_extra_exits_2_with_the_install_command_that_fits(prefix: str, advice: str) -> None:
    done = subprocess.run([sys.executable, "-c", BLOCK_DEV_EXTRA.replace("PREFIX", repr(prefix))],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == (
        "Error: `dc-broker dev` runs the dev IdP, which needs hypercorn, starlette: not installed with this "
        f"dc-broker. Add them with {advice}\n"
    )
    assert "--force" not in done.stderr


# ---------------------------------------------------------------- an interactive add while a broker runs


def test_an_add_while_a_broker_runs_logs_no_spurious_warning(idp: str, home: dict[str, str], tmp_path: Path) -> None:
    init_keyfile(home, tmp_path)
    daemon = subprocess.Popen([DC_BROKER, "run"], env=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_socket(home["DC_BROKER_SOCKET"], daemon)
        assert add_demo(home, idp).returncode == 0
        assert dc_token(home["DC_BROKER_SOCKET"], "acme").returncode == 0
    finally:
        stop(daemon)
    assert daemon.stderr is not None
    log = daemon.stderr.read()
    assert "no password stored" not in log


# ---------------------------------------------------------------- completion and wording


def test_dc_token_exec_tab_offers_profiles_only(tmp_path: Path) -> None:
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "dc-token").write_text("#!/bin/sh\necho acme\necho etl\n")
    (stub / "dc-token").chmod(0o755)
    from dc_broker.cli import cli as group

    source = script(group, "bash")
    probe = source + '\nCOMP_WORDS=(dc-token exec ""); COMP_CWORD=2; _dc_token_complete; echo "${COMPREPLY[*]}"\n'
    probe += 'COMP_WORDS=(dc-token ""); COMP_CWORD=1; _dc_token_complete; echo "${COMPREPLY[*]}"\n'
    env = {**os.environ, "PATH": f"{stub}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, env=env, timeout=30).stdout.splitlines()
    assert out[-2:] == ["acme etl", "exec git-credential acme etl"]


def test_set_acme_tab_offers_the_keys() -> None:
    env = {**os.environ, "_DC_BROKER_COMPLETE": "bash_complete", "COMP_WORDS": "dc-broker set acme scope=x ",
           "COMP_CWORD": "4"}  # fmt: skip
    done = subprocess.run([DC_BROKER], env=env, capture_output=True, text=True, timeout=30)
    offered = [line.split(",", 1)[1] for line in done.stdout.splitlines()]
    from dc_broker.config import SETTABLE_KEYS

    assert offered == [f"{k}=" for k in SETTABLE_KEYS if k != "scope"]  # each key once, scope already typed


def test_a_config_value_of_the_wrong_type_is_named_as_a_person_reads_it(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('[profiles.acme]\nclient_id = ""\ntoken_url = "https://x.example/t"\n')
    done = subprocess.run([DC_BROKER, "list", "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert done.stderr == f"Error: {cfg}:2: profiles.acme.client_id must be text in quotes, not empty\n"
    assert "str" not in done.stderr


# ---------------------------------------------------------------- what the messages look like


def test_set_allow_prints_the_rules_as_they_are_written(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        '[profiles.acme]\nclient_id = "c"\ntoken_url = "https://x.example/t"\ngrant = "client_credentials"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DC_BROKER_")}
    env["DC_BROKER_SOCKET"] = str(tmp_path / "none.sock")
    one = subprocess.run([DC_BROKER, "set", "--config", str(cfg), "acme", "allow=user:carol"],
                         capture_output=True, text=True, env=env, timeout=30)  # fmt: skip
    assert (one.returncode, one.stdout) == (0, 'Updated profile acme: allow = ["user:carol"].\n'), one.stderr
    two = subprocess.run([DC_BROKER, "set", "--config", str(cfg), "acme", "allow=user:carol,group:staff"],
                         capture_output=True, text=True, env=env, timeout=30)  # fmt: skip
    assert (two.returncode, two.stdout) == (0, 'Updated profile acme: allow = ["user:carol", "group:staff"].\n'), (
        two.stderr
    )


def test_every_commands_help_is_plain_text() -> None:
    """click prints a docstring as it is: reST markup (``--limit``) shows up in --help verbatim."""
    import click

    from dc_broker.cli import cli as dc_broker

    def commands(group: click.Group, path: str) -> Iterator[tuple[str, click.Command]]:
        for name, command in group.commands.items():
            yield f"{path} {name}", command
            if isinstance(command, click.Group):
                yield from commands(command, f"{path} {name}")

    marked = []
    for path, command in commands(dc_broker, "dc-broker"):
        with click.Context(command, info_name=path) as ctx:
            if "``" in command.get_help(ctx):
                marked.append(path)
    assert marked == []


@pytest.mark.skipif(not ROOT, reason="needs root to run dc-broker as another user (setpriv)")
def test_a_socket_given_with_socket_that_you_may_not_use_gets_the_permission_message(tmp_path: Path) -> None:
    """`--socket /run/dc-broker/broker.sock` (or $DC_BROKER_SOCKET) from a user outside the broker's
    group: the permission message and its fix (exit 9), not click's "File ... is not readable"."""
    import socket

    shared = Path(tempfile.mkdtemp(prefix="dcb-shared-"))
    listener = socket.socket(socket.AF_UNIX)
    try:
        shared.chmod(0o755)
        path = shared / "broker.sock"
        listener.bind(str(path))
        listener.listen(1)
        path.chmod(0o660)  # root's, group root: nobody is outside
        env = {"PATH": os.environ["PATH"], "HOME": str(shared), "LANG": "C.UTF-8"}
        for how in (["--socket", str(path)], []):
            run_env = env if how else {**env, "DC_BROKER_SOCKET": str(path)}
            done = subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", DC_BROKER, "status", *how],
                env=run_env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert done.returncode == 9, (how, done.stderr)
            assert done.stderr == f"Error: {no_permission(path)}\n"  # not click's "is not readable"
    finally:
        listener.close()
        shutil.rmtree(shared)
